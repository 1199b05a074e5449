"""Runtime: stage backends (ONNX Runtime, TensorRT), the early-exit pipeline, streaming sources, benchmark.

Never imports torch or ``dmpo_edge.compile``; heavy packages (onnxruntime, tensorrt, pycuda, cv2) load
inside the functions that use them, so ``import dmpo_edge.runtime`` needs numpy only.
"""

from __future__ import annotations

import importlib

__all__ = ["Pipeline", "Results", "run_all_stages", "get_backend", "stream", "open_source"]

_LAZY = {
    "Pipeline": ".pipeline", "Results": ".pipeline", "run_all_stages": ".static", "get_backend": ".backends",
    "stream": ".stream", "open_source": ".sources",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
