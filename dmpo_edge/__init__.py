"""dmpo-edge: early-exit DMPO classifiers from ``model.pt`` to per-stage engines and an early-exit runtime.

Importing this package needs numpy only; torch, onnx, onnxruntime, tensorrt and pycuda are imported
inside the functions that use them (see :mod:`dmpo_edge._lazy`).
"""

from .bundle import Bundle
from .errors import DmpoEdgeError
from .preprocess import Preprocess

__version__ = "0.1.0"
__all__ = ["Bundle", "DmpoEdgeError", "Preprocess", "__version__"]
