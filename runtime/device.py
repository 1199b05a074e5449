"""A thin CUDA device layer for the TensorRT backend: memory, copies, streams, events - and nothing else.

Two implementations behind one interface, chosen by :func:`get_device`:

- ``pycuda``: ``pycuda.driver`` on the device's *primary* context (retained, never ``pycuda.autoinit``,
  so TensorRT, ONNX Runtime and other libraries in the process share one context). pycuda needs the
  context current in each thread that calls it: :meth:`Device.bind_thread` pushes and pops it.
- ``cuda-python``: the CUDA runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` on older
  releases), which uses the primary context in every thread by itself.

Nothing here launches a kernel: survivors are regrouped by the ``keep_idx`` gather inside the stage
graph, so the device layer only moves bytes - and, for the TensorRT backend's CUDA graphs, captures a
stream's work into a graph and replays it (``begin_capture`` / ``end_capture`` / ``launch_graph`` /
``destroy_graph``; capture is thread-local, so other stages' threads keep working meanwhile).

CUDA graphs exist on the cuda-python layer only. No pycuda release has stream capture (its ``Stream`` has
``synchronize``, ``is_done``, ``wait_for_event`` and ``handle``; graph support lives in unmerged pull requests
of inducer/pycuda), so :meth:`PycudaDevice.graphs_supported` is False and the TensorRT backend says so once in
its log and runs without graphs.

Which cuda-python: ``cuda-bindings`` 13.x needs a CUDA 13 driver; 12.x runs on CUDA 12 and 13 drivers
(JetPack 6 is CUDA 12.6). The ``trt`` / ``trt-cu12`` extras pin ``cuda-python>=12.6,<13``, ``trt-cu13`` pins 13.x.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy as np

from .._lazy import available, require
from ..errors import DmpoEdgeError

__all__ = ["Device", "DeviceBuffer", "get_device", "device_info", "cuda_device_present"]


class DeviceBuffer:
    """A device allocation: ``ptr`` (int), ``nbytes``; ``free()`` is idempotent."""

    __slots__ = ("ptr", "nbytes", "_owner", "_free")

    def __init__(self, ptr: int, nbytes: int, owner=None, free=None):
        self.ptr, self.nbytes, self._owner, self._free = int(ptr), int(nbytes), owner, free

    def free(self) -> None:
        if self._free is not None:
            f, self._free = self._free, None
            f()
        self._owner = None

    def __int__(self):
        return self.ptr


class Device:
    """Interface; see :class:`PycudaDevice` and :class:`CudaPythonDevice`."""

    impl = "none"

    def bind_thread(self):
        """Context manager making the device current in the calling thread (no-op where not needed)."""
        return contextlib.nullcontext()

    def name(self) -> str: ...
    def compute_capability(self) -> tuple: ...
    def pinned_empty(self, shape, dtype) -> np.ndarray: ...
    def malloc(self, nbytes: int) -> DeviceBuffer: ...
    def stream(self): ...
    def stream_handle(self, stream) -> int: ...
    def destroy_stream(self, stream) -> None:
        """Release a stream from :meth:`stream` (no-op where the binding frees it with its last reference)."""
    def event(self): ...
    def timing_event(self):
        """An event that records a timestamp (``event()`` may skip timing to be cheaper)."""
    def elapsed_ms(self, start, end) -> float:
        """Device time between two completed timing events, in milliseconds."""
    def destroy_event(self, event) -> None:
        """Release an event from :meth:`event` / :meth:`timing_event` (no-op where the binding frees it itself)."""
    def record(self, event, stream) -> None: ...
    def wait_event(self, stream, event) -> None: ...
    def synchronize(self, stream) -> None: ...
    def htod_async(self, dst: int, src: np.ndarray, stream) -> None: ...
    def dtoh_async(self, dst: np.ndarray, src: int, stream) -> None: ...
    def dtod_async(self, dst: int, src: int, nbytes: int, stream) -> None: ...
    def close(self) -> None: ...

    # CUDA graphs (stream capture). graphs_supported() False: the caller never captures.
    def graphs_supported(self) -> bool:
        return False
    def begin_capture(self, stream) -> None:
        """Start capturing ``stream`` (thread-local mode: other threads' CUDA calls are unaffected)."""
        raise NotImplementedError
    def end_capture(self, stream):
        """End the capture and return an instantiated graph (raises when the capture was invalidated)."""
        raise NotImplementedError
    def launch_graph(self, graph, stream) -> None: ...
    def destroy_graph(self, graph) -> None: ...


class PycudaDevice(Device):
    impl = "pycuda"

    def __init__(self, index: int = 0):
        self.cuda = require("pycuda.driver", "the TensorRT backend (device memory and streams)")
        self.cuda.init()
        if index >= self.cuda.Device.count():
            raise DmpoEdgeError("cuda", f"device {index} does not exist ({self.cuda.Device.count()} CUDA device(s) found)")
        self.dev = self.cuda.Device(index)
        # The primary context: the one the CUDA runtime (TensorRT, ORT) uses too. Never autoinit.
        self.ctx = self.dev.retain_primary_context()
        self._local = threading.local()

    @contextlib.contextmanager
    def bind_thread(self):
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self.ctx.push()
        self._local.depth = depth + 1
        try:
            yield self
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                self.cuda.Context.pop()

    def name(self):
        return self.dev.name()

    def compute_capability(self):
        return tuple(self.dev.compute_capability())

    def pinned_empty(self, shape, dtype):
        return self.cuda.pagelocked_empty(shape, dtype)

    def malloc(self, nbytes):
        a = self.cuda.mem_alloc(max(1, int(nbytes)))
        return DeviceBuffer(int(a), nbytes, owner=a, free=a.free)

    def stream(self):
        return self.cuda.Stream()

    def stream_handle(self, stream):
        return int(stream.handle)

    def event(self):
        return self.cuda.Event()

    def timing_event(self):
        return self.cuda.Event()  # flags 0: timing enabled

    def elapsed_ms(self, start, end):
        return float(end.time_since(start))

    def record(self, event, stream):
        event.record(stream)

    def wait_event(self, stream, event):
        stream.wait_for_event(event)

    def synchronize(self, stream):
        stream.synchronize()

    def htod_async(self, dst, src, stream):
        self.cuda.memcpy_htod_async(int(dst), src, stream)

    def dtoh_async(self, dst, src, stream):
        self.cuda.memcpy_dtoh_async(dst, int(src), stream)

    def dtod_async(self, dst, src, nbytes, stream):
        self.cuda.memcpy_dtod_async(int(dst), int(src), int(nbytes), stream)

    # No graphs_supported() override: no pycuda release (2024.1.2 to 2026.1) has stream capture, so CUDA
    # graphs run through the cuda-python layer only (see the module docstring). pycuda's Stream and Event are
    # freed with their last reference, so destroy_stream / destroy_event stay no-ops.

    def close(self):
        with contextlib.suppress(Exception):
            self.ctx.detach()


def _cudart():
    """``cuda.bindings.runtime`` (cuda-python >= 12.6) or the older ``cuda.cudart``."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        if available(name):
            return require(name)
    return require("cuda.bindings.runtime", "the TensorRT backend (device memory and streams)")


class CudaPythonDevice(Device):
    impl = "cuda-python"

    def __init__(self, index: int = 0):
        self.rt = _cudart()
        n = self._ok(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if index >= n:
            raise DmpoEdgeError("cuda", f"device {index} does not exist ({n} CUDA device(s) found)")
        self.index = index
        self._ok(self.rt.cudaSetDevice(index), "cudaSetDevice")
        self._props = self._ok(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        self._pinned = []

    def _ok(self, res, what):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            _, msg = self.rt.cudaGetErrorString(err)
            raise DmpoEdgeError("cuda", f"{what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    @contextlib.contextmanager
    def bind_thread(self):
        # The runtime API's current device is per thread; the primary context comes with it.
        self._ok(self.rt.cudaSetDevice(self.index), "cudaSetDevice")
        yield self

    def name(self):
        n = self._props.name
        return (n.decode(errors="replace") if isinstance(n, bytes) else str(n)).split("\x00")[0]

    def compute_capability(self):
        return (int(self._props.major), int(self._props.minor))

    def pinned_empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        ptr = self._ok(self.rt.cudaMallocHost(nbytes), "cudaMallocHost")
        raw = (ctypes.c_byte * nbytes).from_address(int(ptr))
        arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        self._pinned.append(int(ptr))
        return arr

    def malloc(self, nbytes):
        ptr = self._ok(self.rt.cudaMalloc(max(1, int(nbytes))), "cudaMalloc")
        return DeviceBuffer(int(ptr), nbytes, free=lambda p=ptr: self.rt.cudaFree(p))

    def stream(self):
        return self._ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def stream_handle(self, stream):
        return int(stream)

    def destroy_stream(self, stream):
        if stream is not None:
            self.rt.cudaStreamDestroy(stream)  # cuda-python does not free streams when the Python object goes

    def event(self):
        return self._ok(self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming), "cudaEventCreate")

    def destroy_event(self, event):
        if event is not None:
            self.rt.cudaEventDestroy(event)

    def timing_event(self):
        return self._ok(self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDefault), "cudaEventCreate")

    def elapsed_ms(self, start, end):
        return float(self._ok(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def record(self, event, stream):
        self._ok(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def wait_event(self, stream, event):
        self._ok(self.rt.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")

    def synchronize(self, stream):
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def _copy(self, dst, src, nbytes, kind, stream):
        self._ok(self.rt.cudaMemcpyAsync(int(dst), int(src), int(nbytes), kind, stream), "cudaMemcpyAsync")

    def htod_async(self, dst, src, stream):
        self._copy(dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def dtoh_async(self, dst, src, stream):
        self._copy(dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def dtod_async(self, dst, src, nbytes, stream):
        self._copy(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)

    def graphs_supported(self):
        return all(hasattr(self.rt, n) for n in ("cudaStreamBeginCapture", "cudaStreamEndCapture",
                                                 "cudaGraphInstantiate", "cudaGraphLaunch", "cudaGraphExecDestroy"))

    def begin_capture(self, stream):
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._ok(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream):
        # Always called after begin_capture, even when the enqueue failed: it takes the stream out of capture.
        # A failed capture (cudaErrorStreamCaptureInvalidated, ...) also leaves its error as the thread's last
        # error; cudaGetLastError clears it so that the next unrelated call does not report it.
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if int(err) != 0:
            self.rt.cudaGetLastError()
            if graph:  # an invalidated capture may still hand back a graph: free it
                self.rt.cudaGraphDestroy(graph)
            self._ok((err,), "cudaStreamEndCapture")
        try:
            res = self.rt.cudaGraphInstantiate(graph, 0)
            if int(res[0]) != 0:
                self.rt.cudaGetLastError()
            return self._ok(res, "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)  # the executable graph does not need its template

    def launch_graph(self, graph, stream):
        self._ok(self.rt.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph):
        self.rt.cudaGraphExecDestroy(graph)

    def close(self):
        for p in self._pinned:
            with contextlib.suppress(Exception):
                self.rt.cudaFreeHost(p)
        self._pinned = []


def _cuda_python_importable() -> bool:
    return available("cuda.bindings.runtime") or available("cuda.cudart")


def get_device(impl: str = "auto", index: int = 0) -> Device:
    """``pycuda`` or ``cuda-python``. ``auto``: cuda-python when it imports and answers (it is the layer with CUDA
    graphs), else pycuda; a cuda-python built for a newer CUDA major than the driver fails to answer and falls
    back to pycuda here instead of failing."""
    if impl == "auto":
        first_error = None
        for name, importable in (("cuda-python", _cuda_python_importable()), ("pycuda", available("pycuda.driver"))):
            if not importable:
                continue
            try:
                return get_device(name, index)
            except DmpoEdgeError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        impl = "cuda-python"  # neither imports: require() names the extra to install
    if impl == "pycuda":
        return PycudaDevice(index)
    if impl in ("cuda-python", "cuda", "cudart"):
        return CudaPythonDevice(index)
    raise DmpoEdgeError("cuda", f"unknown device layer '{impl}'. Expected auto, pycuda or cuda-python")


def cuda_device_present() -> bool:
    """True when a CUDA device answers (never raises)."""
    if _cuda_python_importable():
        try:
            err, n = _cudart().cudaGetDeviceCount()
            if int(err) == 0 and n > 0:
                return True
        except Exception:
            pass
    if available("pycuda.driver"):
        try:
            cuda = require("pycuda.driver")
            cuda.init()
            return cuda.Device.count() > 0
        except Exception:
            pass
    return False


def device_info(dev: Device | None = None) -> dict:
    """``{"gpu": name, "sm": "87", "compute_capability": [8, 7]}`` of device 0 (or ``dev``)."""
    d = dev or get_device()
    major, minor = d.compute_capability()
    return {"gpu": d.name(), "sm": f"{major}{minor}", "compute_capability": [major, minor]}
