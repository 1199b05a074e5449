"""Run a model repository under the ``tritonserver`` binary of the PyTriton wheel, without PyTriton.

What the wheel lacks next to a container's ``/opt/tritonserver``: a backends folder with the Python-backend
stub for this interpreter (the wheel keeps one stub per Python version apart), and the environment: this
interpreter's ``bin`` first in ``PATH`` (the stub's embedded Python finds its ``site-packages`` from it) and its
``LIBDIR`` first in ``LD_LIBRARY_PATH`` (see :mod:`.env`). Used by the tests and the load benchmark; in a
container ``tritonserver --model-repository REPO`` is all it takes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from ...errors import DmpoEdgeError
from .env import library_path, stub_path, tritonserver_binary, wheel_dir, wheel_libs
from .ports import wait_models_ready

__all__ = ["TritonServerProcess", "backend_directory", "server_env", "main"]


def backend_directory(workdir: str) -> str:
    """``workdir/backends/python``: the wheel's Python backend plus the stub for this interpreter."""
    src = os.path.join(wheel_dir(), "tritonserver", "backends", "python")
    dst = os.path.join(workdir, "backends", "python")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.startswith("__"):
            continue
        target = os.path.join(dst, name)
        if not os.path.exists(target):
            os.symlink(os.path.join(src, name), target)
    stub = os.path.join(dst, "triton_python_backend_stub")
    if not os.path.exists(stub):
        shutil.copy2(stub_path(), stub)
    return os.path.dirname(dst)


def server_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "/usr/bin:/bin")])
    env["LD_LIBRARY_PATH"] = library_path(wheel_libs(), base=env.get("LD_LIBRARY_PATH", ""))
    return env


class TritonServerProcess:
    """One ``tritonserver`` process on a repository: ``start()``, ``wait_ready()``, ``stop()`` (by its own pid)."""

    def __init__(self, repo: str, workdir: str, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, exit_timeout_s: int = 30, extra_args=()):
        self.repo, self.workdir, self.host = os.path.abspath(repo), os.path.abspath(workdir), host
        self.http_port, self.grpc_port, self.metrics_port = int(http_port), int(grpc_port), int(metrics_port)
        self.exit_timeout_s = int(exit_timeout_s)
        self.extra_args = list(extra_args)
        self.proc = None
        self.log_path = os.path.join(self.workdir, "tritonserver.log")

    def command(self) -> list:
        return [tritonserver_binary(), f"--model-repository={self.repo}",
                f"--backend-directory={backend_directory(self.workdir)}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", f"--exit-timeout-secs={self.exit_timeout_s}", *self.extra_args]

    def start(self) -> "TritonServerProcess":
        os.makedirs(self.workdir, exist_ok=True)
        cmd = self.command()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=server_env(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_ready(self, models, timeout_s: float = 180.0) -> None:
        def fail(name):
            tail = "\n".join(self.log().splitlines()[-15:])
            raise DmpoEdgeError("tritonserver", f"model {name} is not ready (exit code {self.proc.poll()}). "
                                f"Log {self.log_path}:\n{tail}")

        wait_models_ready(self.host, self.http_port, models, lambda: self.proc.poll() is None, timeout_s, fail)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests, then exits); SIGKILL after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    """``python -m dmpo_edge.runtime.serve.launch REPO WORKDIR [tritonserver options]``: become tritonserver.

    The process is replaced (exec), so whoever started this command holds tritonserver's own pid: a SIGTERM to
    it drains and stops the server, and nothing else is left behind.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m dmpo_edge.runtime.serve.launch REPO WORKDIR [--http-port=N ...]", file=sys.stderr)
        return 2
    repo, workdir, extra = argv[0], argv[1], argv[2:]
    os.makedirs(workdir, exist_ok=True)
    cmd = [tritonserver_binary(), f"--model-repository={os.path.abspath(repo)}",
           f"--backend-directory={backend_directory(os.path.abspath(workdir))}", "--allow-gpu-metrics=false", *extra]
    sys.stdout.flush()
    os.execve(cmd[0], cmd, server_env())
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
