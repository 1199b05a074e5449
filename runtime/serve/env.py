"""The serving environment: is PyTriton usable here, where is ``tritonserver``, what must its environment hold.

Facts from running the wheel (nvidia-pytriton 0.7.0, tritonserver 2.51) on CPU-only Linux:

- PyTriton pins numpy < 2, while the rest of dmpo-edge runs on numpy 2: ``serve`` gets its own virtualenv;
- the wheel's binaries need glibc >= 2.35 and a Python built with a shared libpython (the Python-backend stub
  embeds it);
- the stub resolves ``libpython3.X.so.1.0`` through ``LD_LIBRARY_PATH`` and the system paths: on a host whose
  distribution ships its own libpython of the same minor version (Debian's ``/lib/x86_64-linux-gnu``), it loaded
  that one instead of the running interpreter's, and failed inside ``threading``
  (``'_thread.RLock' object has no attribute '_recursion_count'``). The interpreter's ``LIBDIR`` goes first.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

from ..._lazy import installed_version
from ...errors import DmpoEdgeError

__all__ = ["check_serve_env", "python_libdir", "library_path", "wheel_dir", "wheel_libs", "tritonserver_binary", "stub_path",
           "SERVE_INSTALL"]

#: how the serve extra is installed beside a numpy-2 environment
SERVE_INSTALL = ("python -m venv .venv-serve && .venv-serve/bin/pip install 'dmpo-edge[serve]' "
                 "(its own virtualenv: PyTriton needs numpy < 2), then run .venv-serve/bin/dmpo-edge serve")


def _glibc() -> tuple | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    try:
        return tuple(int(p) for p in text.split()[-1].split(".")[:2])
    except (ValueError, IndexError):
        return None


def check_serve_env(where: str = "serve") -> None:
    """Raise one clear DmpoEdgeError when PyTriton cannot run in this interpreter; import nothing heavy."""
    from packaging.version import Version

    if not sys.platform.startswith("linux"):
        raise DmpoEdgeError(where, f"Triton Inference Server runs on Linux only (this is {platform.system()}). "
                            "Use NVIDIA's NGC Triton container: see 'dmpo-edge export-triton'")
    if installed_version("nvidia-pytriton") is None:
        raise DmpoEdgeError(where, "PyTriton is not installed. Install the 'serve' extra in its own environment: "
                            + SERVE_INSTALL)
    np_version = installed_version("numpy")
    if np_version is not None and Version(np_version) >= Version("2"):
        raise DmpoEdgeError(where, f"numpy {np_version} is installed here, and PyTriton needs numpy < 2. "
                            "Install the 'serve' extra in its own environment: " + SERVE_INSTALL)
    g = _glibc()
    if g is not None and g < (2, 35):
        raise DmpoEdgeError(where, f"glibc {g[0]}.{g[1]} is too old for the tritonserver in the PyTriton wheel "
                            "(needs >= 2.35, e.g. Ubuntu 22.04). Use NVIDIA's NGC Triton container with 'dmpo-edge export-triton'")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise DmpoEdgeError(where, f"this Python ({sys.executable}) has no shared libpython, which Triton's Python "
                            "backend embeds. Use a Python built with --enable-shared (distribution packages, "
                            "pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared, conda)")


def python_libdir() -> str:
    """Where this interpreter's own ``libpython3.X.so`` lives."""
    return str(sysconfig.get_config_var("LIBDIR") or os.path.join(sys.base_prefix, "lib"))


def library_path(*extra: str, base: str | None = None) -> str:
    """``LD_LIBRARY_PATH`` for tritonserver and its stubs: this interpreter's LIBDIR first (see the module doc)."""
    parts = [python_libdir(), *extra]
    rest = os.environ.get("LD_LIBRARY_PATH", "") if base is None else base
    parts += [p for p in rest.split(os.pathsep) if p]
    seen, out = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return os.pathsep.join(out)


def wheel_dir() -> str:
    """The ``pytriton`` package folder (found without importing PyTriton, which pulls in its whole stack)."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise DmpoEdgeError("serve", "PyTriton is not installed. Install the 'serve' extra in its own environment: "
                            + SERVE_INSTALL)
    return list(spec.submodule_search_locations)[0]


def tritonserver_binary() -> str:
    return os.path.join(wheel_dir(), "tritonserver", "bin", "tritonserver")


def wheel_libs() -> str:
    """The shared libraries the wheel's tritonserver links against (auditwheel's ``nvidia_pytriton.libs``)."""
    return os.path.join(os.path.dirname(wheel_dir()), "nvidia_pytriton.libs")


def stub_path(version: str | None = None) -> str:
    """The Python-backend stub built for this interpreter's minor version."""
    version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    p = os.path.join(wheel_dir(), "tritonserver", "python_backend_stubs", version, "triton_python_backend_stub")
    if not os.path.isfile(p):
        raise DmpoEdgeError("serve", f"the PyTriton wheel has no Python-backend stub for Python {version} ({p}). "
                            "Use a Python version it ships a stub for")
    return p
