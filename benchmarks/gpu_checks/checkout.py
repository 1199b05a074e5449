"""``dmpo_edge`` imported from this checkout, so the kit runs on a bare GPU machine without ``pip install -e .``.

The repository keeps ``compile/``, ``runtime/`` and ``calib/`` at the top and installs them as subpackages of
``dmpo_edge`` (pyproject.toml's package-dir); without an install, :func:`bootstrap_imports` maps them the same way.
It must run before anything here imports ``dmpo_edge``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["ROOT", "IMPORT_MODE", "bootstrap_imports"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPORT_MODE = None  # set by bootstrap_imports: "installed" or "mapped from the checkout ..."


def bootstrap_imports() -> str:
    """Make ``dmpo_edge`` (with ``compile``/``runtime``/``calib`` mapped as in pyproject.toml) importable."""
    global IMPORT_MODE
    try:
        import dmpo_edge.calib  # noqa: F401
        import dmpo_edge.compile  # noqa: F401
        import dmpo_edge.runtime  # noqa: F401

        IMPORT_MODE = "installed"
        return IMPORT_MODE
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "dmpo_edge" or m.startswith("dmpo_edge.")]:
        del sys.modules[name]

    def load(name: str, folder: str) -> None:
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)

    load("dmpo_edge", os.path.join(ROOT, "dmpo_edge"))
    for sub in ("compile", "runtime", "calib"):
        load(f"dmpo_edge.{sub}", os.path.join(ROOT, sub))
    IMPORT_MODE = "mapped from the checkout (not pip-installed)"
    return IMPORT_MODE
