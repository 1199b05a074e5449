"""Ports: refuse one that is taken before anything starts, so a clash is one clear line and nothing is left running."""

from __future__ import annotations

import socket

from ...errors import DmpoEdgeError

__all__ = ["check_ports_free", "free_port", "wait_models_ready"]


def check_ports_free(host: str, ports: dict, where: str = "serve") -> None:
    """``ports``: role -> port. Raise a DmpoEdgeError naming the first port another process holds (or repeated)."""
    seen = {}
    for role, port in ports.items():
        if port is None:
            continue
        port = int(port)
        if not 0 < port < 65536:
            raise DmpoEdgeError(where, f"--{role}-port {port} is not a TCP port. Expected 1-65535")
        if port in seen:
            raise DmpoEdgeError(where, f"--{role}-port and --{seen[port]}-port are both {port}. Give each its own port")
        seen[port] = role
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # as the servers bind: connections of a just-stopped server in TIME_WAIT must not block a restart,
            # while a socket listening on the port still does (Linux refuses the bind then)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise DmpoEdgeError(where, f"{role} port {host}:{port} is not available ({exc.strerror or exc}). "
                                    f"Stop what holds it or pass another --{role}-port") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_models_ready(host: str, http_port: int, models, alive, timeout_s: float, fail) -> None:
    """Return once every model answers ready on Triton's HTTP endpoint (binding or loading a model returns before it is
    ready). ``fail(name)`` raises the caller's own error when the server died (``alive()`` false) or time ran out."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    for name in models:
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{int(http_port)}/v2/models/{name}/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if not alive() or time.monotonic() > deadline:
                fail(name)
            time.sleep(0.2)
