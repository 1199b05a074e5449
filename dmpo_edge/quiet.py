"""One line on stderr: third-party warnings and library output are collected and summarised, not streamed.

A deployment script reads dmpo-edge's stderr as one line ("dmpo-edge: error: where | what. what to do"). Torch,
Pillow, OpenCV, FFmpeg and ONNX Runtime write warnings and decoder noise there too - up to 303 lines before the
one that matters. While a command runs (unless ``--verbose``):

- Python warnings raised outside dmpo-edge's own code are recorded; dmpo-edge's own warnings (e.g. "unpickling
  runs code from the file") still print in full, they are addressed to the user;
- what C and C++ libraries write to file descriptor 2 goes into a pipe whose reader counts the lines and keeps
  the first few (memory stays bounded on a stream that runs for weeks); Python-level writes to ``sys.stderr``
  - progress bars, dmpo-edge's own messages - still reach the terminal through a duplicate of the real stderr.

At the end :func:`summary` gives one sentence (count + first message) that the CLI appends to its last line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import threading
import warnings

from .terminal import printable

__all__ = ["library_output_collected"]

_KEEP = 3  # first lines kept from the library output


def _own_roots() -> tuple:
    roots = [os.path.dirname(os.path.abspath(__file__))]
    for sub in ("runtime", "compile", "calib"):  # separate folders in a source checkout (package-dir mapping)
        try:
            spec = importlib.util.find_spec(f"dmpo_edge.{sub}")
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            roots.append(os.path.abspath(loc))
    return tuple(r + os.sep for r in roots)


class _Collected:
    def __init__(self):
        self.warnings = []  # third-party warning messages
        self.lines = 0
        self.first_lines = []

    def summary(self) -> str | None:
        parts = []
        if self.warnings:
            parts.append(f"{len(self.warnings)} library warning(s)")
        if self.lines:
            parts.append(f"{self.lines} line(s) of library output")
        if not parts:
            return None
        first = (self.warnings or self.first_lines)[0]
        return f"{' and '.join(parts)} hidden, first: {printable(first)[:200]!r}; --verbose shows them"


class _FdReader(threading.Thread):
    def __init__(self, fd: int, into: _Collected):
        super().__init__(daemon=True, name="dmpo-stderr-collector")
        self.fd, self.into = fd, into

    def run(self):
        pending = b""
        with io.FileIO(self.fd, "r", closefd=True) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                pending += chunk
                *done, pending = pending.split(b"\n")
                self._count(done)
                pending = pending[-4096:]
        self._count([pending] if pending.strip() else [])

    def _count(self, lines):
        for line in lines:
            text = line.decode("utf-8", "replace").strip()
            if not text:
                continue
            self.into.lines += 1
            if len(self.into.first_lines) < _KEEP:
                self.into.first_lines.append(text)


def _real_stderr() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False  # replaced by a test harness or an embedding application: leave it alone


@contextlib.contextmanager
def library_output_collected(verbose: bool = False):
    """Yield a collector whose ``summary()`` is None or one sentence; with ``verbose`` nothing is collected."""
    got = _Collected()
    if verbose:
        yield got
        return
    roots = _own_roots()
    redirect = _real_stderr() and hasattr(os, "pipe")
    old_stderr, saved, reader = sys.stderr, None, None
    if redirect:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
        reader = _FdReader(r, got)
        reader.start()
        os.dup2(w, 2)
        os.close(w)
        sys.stderr = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                                      errors="backslashreplace", line_buffering=True)
    caught: list = []
    try:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                yield got
        finally:
            # Re-emitted only after the recording block has closed: inside it, showwarning appends to `caught` itself
            # (and under an outer recorder such as pytest.warns, to the list being iterated), which never ends.
            for w_ in caught:
                if os.path.abspath(w_.filename).startswith(roots):
                    warnings.showwarning(w_.message, w_.category, w_.filename, w_.lineno, sys.stderr)
                else:
                    got.warnings.append(f"{w_.category.__name__}: {str(w_.message).splitlines()[0] if str(w_.message) else ''}")
    finally:
        if redirect:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last write end closes here: the reader sees the end
            os.close(saved)
            with contextlib.suppress(Exception):
                sys.stderr.close()
            sys.stderr = old_stderr
            reader.join(timeout=5)
