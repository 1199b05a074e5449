"""Input checks shared by the pipeline, the static runner and the stream: wrong shape, dtype or values.

Non-finite inputs (NaN / Inf) are refused with a DmpoEdgeError naming the rows: a NaN frame would give
a NaN confidence, which never passes a threshold and so silently costs the full model and a garbage
class. Refusing is the safe default; the stream catches it per micro-batch and reports the frames.
"""

from __future__ import annotations

import numpy as np

from ..errors import DmpoEdgeError
from ._common import input_shape

__all__ = ["check_batch", "nonfinite_rows"]


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of samples with a NaN or Inf anywhere."""
    if x.shape[0] == 0:
        return np.zeros((0,), np.int64)
    return np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))


def check_batch(bundle, x, where: str = "pipeline", allow_nonfinite: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous float32 N x 3 x H x W array, or a DmpoEdgeError that names the expected shape."""
    shape = input_shape(bundle)
    expect = "N x " + " x ".join(str(d) for d in shape) + " float32 (preprocessed images; see Bundle.preprocess)"
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception:
            raise DmpoEdgeError(where, f"input of type {type(x).__name__} is not an array. Expected {expect}") from None
    if x.ndim == len(shape) and tuple(x.shape) == shape:
        raise DmpoEdgeError(where, f"input has shape {tuple(x.shape)}, a single sample without the batch axis. "
                            f"Expected {expect}; use x[None] for one sample")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise DmpoEdgeError(where, f"input has shape {tuple(x.shape)}. Expected {expect}")
    if x.dtype != np.float32:
        if x.dtype in (np.float16, np.float64):
            x = x.astype(np.float32)
        else:
            raise DmpoEdgeError(where, f"input dtype is {x.dtype}. Expected {expect}")
    if not allow_nonfinite:
        bad = nonfinite_rows(x)
        if bad.size:
            shown = ", ".join(str(i) for i in bad[:8]) + (" ..." if bad.size > 8 else "")
            raise DmpoEdgeError(where, f"{bad.size} sample(s) contain NaN or Inf (rows {shown}). Expected finite preprocessed images")
    return np.ascontiguousarray(x)
