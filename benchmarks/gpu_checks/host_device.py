"""The device interface on host memory (ctypes copies, no streams): what ``gpu_check.py --dry-run`` runs the
device checks on where there is no CUDA, and the byte-exact comparison every device check uses."""

from __future__ import annotations

import ctypes

import numpy as np

from dmpo_edge.runtime.device import Device, DeviceBuffer

__all__ = ["HostDevice", "same_bits"]


class _HostEvent:
    def __init__(self):
        self.recorded = False


class HostDevice(Device):
    """The device interface on host memory: what ``--dry-run`` uses in place of pycuda / cuda-python."""

    impl = "host"

    def __init__(self):
        self._keep = {}

    def name(self):
        return "host memory (dry run)"

    def compute_capability(self):
        return (0, 0)

    def pinned_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def malloc(self, nbytes):
        raw = np.empty(max(1, int(nbytes)), np.uint8)
        ptr = raw.ctypes.data
        self._keep[ptr] = raw
        return DeviceBuffer(ptr, nbytes, owner=raw, free=lambda p=ptr: self._keep.pop(p, None))

    def stream(self):
        return object()

    def stream_handle(self, stream):
        return id(stream)

    def event(self):
        return _HostEvent()

    def record(self, event, stream):
        event.recorded = True

    def wait_event(self, stream, event):
        pass

    def synchronize(self, stream):
        pass

    def htod_async(self, dst, src, stream):
        src = np.ascontiguousarray(src)
        ctypes.memmove(int(dst), src.ctypes.data, src.nbytes)

    def dtoh_async(self, dst, src, stream):
        ctypes.memmove(dst.ctypes.data, int(src), dst.nbytes)

    def dtod_async(self, dst, src, nbytes, stream):
        ctypes.memmove(int(dst), int(src), int(nbytes))

    def close(self):
        self._keep.clear()


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of ``a`` (NaN payloads and signed zeros compare as stored)."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))
