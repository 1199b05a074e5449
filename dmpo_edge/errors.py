"""The one user-facing exception family.

Messages are shaped ``where | what happened. what was expected / what to do`` so that the CLI
can print a single line that a deployment engineer can act on without reading a traceback.
"""

__all__ = ["DmpoEdgeError"]


class DmpoEdgeError(Exception):
    """A problem the user can fix: bad input, a missing extra, a bundle that does not verify."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where} | {message}")
