"""Input checks shared by the pipeline, the static runner and the stream: wrong shape, dtype or values.

Non-finite inputs (NaN / Inf) are refused with a DmpoEdgeError naming the rows: a NaN frame would give
a NaN confidence, which never passes a threshold and so silently costs the full model and a garbage
class. Refusing is the safe default; the stream catches it per micro-batch and reports the frames.
"""

from __future__ import annotations

import numpy as np

from ..errors import DmpoEdgeError
from ._common import input_shape

__all__ = ["check_batch", "nonfinite_rows", "check_int", "check_float", "MAX_IN_FLIGHT"]

#: batches in flight at most: stage 0 gets one worker thread per batch in flight, and past a few dozen more
#: threads only add contention (100,000 used to start threads for 21 s until the OS refused)
MAX_IN_FLIGHT = 64


def check_int(value, name: str, where: str, lo: int = 1, hi: int = 1 << 16) -> int:
    """An integer in [lo, hi]: refuses booleans, strings, floats with a fraction, NaN / inf and huge numbers."""
    ok = not isinstance(value, (bool, str, bytes)) and isinstance(value, (int, np.integer, float, np.floating))
    if ok and isinstance(value, (float, np.floating)):
        ok = bool(np.isfinite(value)) and float(value).is_integer()
    if not ok or not lo <= int(value) <= hi:
        raise DmpoEdgeError(where, f"{name} {value!r} must be an integer in {lo}..{hi}")
    return int(value)


def check_float(value, name: str, where: str, lo: float = 0.0, hi: float = 3.6e6) -> float:
    """A finite number in [lo, hi] (no NaN, no inf, no 1e300 that overflows a timeout)."""
    try:
        ok = not isinstance(value, (bool, str, bytes)) and np.isfinite(float(value)) and lo <= float(value) <= hi
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise DmpoEdgeError(where, f"{name} {value!r} must be a finite number in [{lo:g}, {hi:g}]")
    return float(value)


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
