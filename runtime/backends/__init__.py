"""Stage backends behind one small interface: ``ort`` (ONNX Runtime), ``trt`` (TensorRT + pycuda /
cuda-python) and ``null`` (no work; measures host overhead). Heavy packages load on ``activate()``."""

from __future__ import annotations

from ...errors import DmpoEdgeError
from .base import Backend
from .null import NullBackend
from .ort import OrtBackend

__all__ = ["Backend", "OrtBackend", "NullBackend", "TrtBackend", "get_backend", "resolve_backend_name", "BACKENDS"]

BACKENDS = ("ort", "trt", "null")


def __getattr__(name):
    # TrtBackend's module is light, but keep the import on first use all the same.
    if name == "TrtBackend":
        from .trt import TrtBackend

        return TrtBackend
    raise AttributeError(name)


def resolve_backend_name(name: str, bundle=None) -> str:
    """``auto`` -> ``trt`` when TensorRT, a GPU and engines for this device exist, else ``ort``."""
    if name != "auto":
        return name
    if bundle is not None:
        from .trt import trt_ready

        if trt_ready(bundle):
            return "trt"
    return "ort"


def get_backend(name: str, bundle=None):
    """The backend class for ``name`` (``ort``, ``trt``, ``null``, or ``auto`` resolved against ``bundle``)."""
    name = resolve_backend_name(str(name).lower(), bundle)
    if name == "ort":
        return OrtBackend
    if name == "null":
        return NullBackend
    if name == "trt":
        from .trt import TrtBackend

        return TrtBackend
    raise DmpoEdgeError("backend", f"unknown backend '{name}'. Expected one of auto, {', '.join(BACKENDS)}")
