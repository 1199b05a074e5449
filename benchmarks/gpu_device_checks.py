"""Checks of the runtime's device layer (``dmpo_edge.runtime.device``) and of the survivor regroup on the device.

Every check compares bytes with a numpy reference, bit for bit:

- :func:`check_copies`: page-locked buffers, host->device, device->device and device->host copies on two
  streams ordered by an event;
- :func:`check_gather`: the ``keep_idx`` gather that regroups survivors inside stage k > 0's graph, run on the
  device by torch (``index_select`` on CUDA, reading the device layer's own allocation through the CUDA array
  interface, on the device layer's own stream) for float32 and float16 features;
- :func:`check_refill_merge`: the TensorRT backend's refill path (``TrtBackend.merge_features``: runs of
  surviving rows coalesced into device-to-device copies) on real device buffers, without TensorRT;
- :func:`check_trt_gather`: a one-node ``Gather`` engine built by TensorRT, bound to device-layer buffers.

:class:`HostDevice` implements the device interface on host memory (ctypes copies, no streams), so that
``gpu_check.py --dry-run`` runs these same checks on a machine without CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import time

import numpy as np

from dmpo_edge.runtime.device import Device, DeviceBuffer

__all__ = ["HostDevice", "check_copies", "check_gather", "check_refill_merge", "check_trt_gather", "gather_cases"]


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


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


def check_copies(dev: Device, mib: int = 16, seed: int = 0) -> dict:
    """Pinned host -> device (stream A) -> device copy (stream A) -> event -> device -> pinned host (stream B)."""
    rng = np.random.default_rng(seed)
    n = int(mib) << 20
    with dev.bind_thread():
        src = dev.pinned_empty((n,), np.uint8)
        src[...] = rng.integers(0, 256, size=n, dtype=np.uint8)
        dst = dev.pinned_empty((n,), np.uint8)
        dst[...] = 0
        a, b = dev.malloc(n), dev.malloc(n)
        s1, s2 = dev.stream(), dev.stream()
        ev = dev.event()
        try:
            t0 = time.perf_counter()
            dev.htod_async(a.ptr, src, s1)
            dev.synchronize(s1)
            t_h2d = time.perf_counter() - t0
            dev.dtod_async(b.ptr, a.ptr, n, s1)
            dev.record(ev, s1)
            dev.wait_event(s2, ev)  # stream B reads what stream A wrote: the event orders them
            t0 = time.perf_counter()
            dev.dtoh_async(dst, b.ptr, s2)
            dev.synchronize(s2)
            t_d2h = time.perf_counter() - t0
            ok = _same_bits(src, dst)
            # A partial copy at an offset: the pointer arithmetic the runtime's refill uses.
            part = dev.pinned_empty((4096,), np.uint8)
            dev.dtoh_async(part, b.ptr + 12345, s2)
            dev.synchronize(s2)
            ok_offset = _same_bits(part, src[12345:12345 + 4096])
        finally:
            a.free()
            b.free()
    gbps = lambda t: round(n / t / 1e9, 2) if t > 0 else None  # noqa: E731
    return {"ok": bool(ok and ok_offset), "bytes": n, "roundtrip_bit_exact": bool(ok), "offset_copy_bit_exact": bool(ok_offset),
            "h2d_GBps": gbps(t_h2d), "d2h_GBps": gbps(t_d2h), "impl": dev.impl}


def gather_cases(rows: int, rng) -> dict:
    """keep_idx patterns the pipeline produces: all rows, a random subset, one row, none, bucket padding, a permutation."""
    sub = np.sort(rng.choice(rows, size=max(1, rows // 3), replace=False))
    return {
        "all": np.arange(rows),
        "subset": sub,
        "single": np.array([rows - 1]),
        "empty": np.zeros(0, np.int64),
        "padded": np.concatenate([sub, np.repeat(sub[-1:], 5)]),  # buckets repeat the last survivor
        "permuted": rng.permutation(rows),
    }


class _CudaArray:
    """The CUDA array interface over a device-layer allocation (no copy): torch reads the runtime's own memory."""

    def __init__(self, ptr: int, shape: tuple, dtype):
        self.__cuda_array_interface__ = {"shape": tuple(int(s) for s in shape), "typestr": np.dtype(dtype).str,
                                         "data": (int(ptr), False), "version": 2, "strides": None}


def _torch_on_buffer(torch, dev: Device, buf: DeviceBuffer, shape, dtype, cuda: bool):
    if cuda:
        return torch.as_tensor(_CudaArray(buf.ptr, shape, dtype), device="cuda")
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * max(1, count * np.dtype(dtype).itemsize)).from_address(buf.ptr)
    return torch.from_numpy(np.frombuffer(raw, dtype=dtype, count=count).reshape(shape))


def _torch_stream(torch, dev: Device, stream, cuda: bool):
    """The device layer's stream as a torch stream, so torch's kernel is ordered with the layer's copies."""
    if not cuda:
        return contextlib.nullcontext()
    handle = dev.stream_handle(stream)
    make = getattr(torch.cuda, "get_stream_from_external", None) or torch.cuda.ExternalStream
    return torch.cuda.stream(make(handle))


def check_gather(dev: Device, torch, cuda: bool, rows: int = 96, shape=(17, 32), seed: int = 1) -> dict:
    """features[keep_idx] by torch.index_select on the device layer's memory and stream vs numpy, bit for bit."""
    rng = np.random.default_rng(seed)
    results = {}
    ok = True
    with dev.bind_thread():
        stream = dev.stream()
        for dtype in (np.float32, np.float16):
            feats = rng.normal(size=(rows, *shape)).astype(dtype)
            feats.reshape(-1)[:4] = np.array([0.0, -0.0, np.inf, -np.inf], dtype)  # bit patterns a cast would change
            host = dev.pinned_empty(feats.shape, dtype)
            host[...] = feats
            buf = dev.malloc(feats.nbytes)
            try:
                dev.htod_async(buf.ptr, host, stream)
                dev.synchronize(stream)
                src = _torch_on_buffer(torch, dev, buf, feats.shape, dtype, cuda)
                for case, keep in gather_cases(rows, rng).items():
                    with _torch_stream(torch, dev, stream, cuda):
                        idx = torch.from_numpy(keep.astype(np.int32))
                        if cuda:
                            idx = idx.to("cuda", non_blocking=False)
                        out = torch.index_select(src, 0, idx)
                        got = out.cpu().numpy()
                    same = _same_bits(got, feats[keep])
                    results[f"{np.dtype(dtype).name}/{case}"] = bool(same)
                    ok = ok and same
            finally:
                buf.free()
    return {"ok": bool(ok), "cases": results, "runner": "torch.index_select on " + ("cuda" if cuda else "cpu"),
            "impl": dev.impl}


def check_refill_merge(dev: Device, bundle, rows: int = 40, shape=(17, 32), seed: int = 2) -> dict:
    """The TensorRT backend's ``merge_features`` (device-to-device copies of survivor runs) on real buffers.

    Builds the backend's pools by hand (no engine needed): two groups' features in device buffers, their
    keep_idx, merged into one buffer, read back and compared with ``concat(f1[keep1], f2[keep2])``.
    """
    import queue

    from dmpo_edge.runtime.backends import trt as trt_mod

    rng = np.random.default_rng(seed)
    dtype = np.float32
    be = trt_mod.TrtBackend(bundle, device=dev.impl)
    be.dev = dev
    st = trt_mod._Stage()
    st.pool, st.merge_pool = queue.Queue(), queue.Queue()
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    bufs = []
    with dev.bind_thread():
        for _ in range(2):
            b = dev.malloc(rows * row_bytes)
            bufs.append(b)
            st.pool.put(trt_mod._DevFeatures(b, 0, tuple(shape), dtype, st.pool, None))
        mb = dev.malloc(2 * rows * row_bytes)
        bufs.append(mb)
        st.merge_pool.put(trt_mod._DevFeatures(mb, 0, tuple(shape), dtype, st.merge_pool, None))
        st.stream = dev.stream()
        st.merge_stream = dev.stream()
        be.stages = [st]
        try:
            hosts, feats = [], []
            for _ in range(2):
                h = rng.normal(size=(rows, *shape)).astype(dtype)
                f = st.pool.get_nowait()
                pinned = dev.pinned_empty(h.shape, dtype)
                pinned[...] = h
                dev.htod_async(f.buf.ptr, pinned, st.stream)
                f.rows = rows
                ev = dev.event()
                dev.record(ev, st.stream)
                f.event = ev  # merge_features must wait on it before copying
                hosts.append(h)
                feats.append(f)
            # survivors with runs and gaps (coalesced copies), and a group with a single survivor
            keeps = [np.array([0, 1, 2, 5, 6, 9, rows - 1], np.int32), np.array([7], np.int32)]
            merged, keep = be.merge_features(feats, keeps)
            got = np.empty((merged.rows, *shape), dtype)
            dev.dtoh_async(got, merged.buf.ptr, st.merge_stream)
            dev.synchronize(st.merge_stream)
            want = np.concatenate([hosts[0][keeps[0]], hosts[1][keeps[1]]])
            ok = _same_bits(got, want) and np.array_equal(keep, np.arange(want.shape[0]))
            returned = st.pool.qsize() == 2  # the sources went back to their pool
        finally:
            be.stages = []
            for b in bufs:
                b.free()
    return {"ok": bool(ok and returned), "merged_rows": int(want.shape[0]), "bit_exact": bool(ok),
            "sources_released": bool(returned), "impl": dev.impl}


def _gather_onnx(dtype, width: int) -> bytes:
    from onnx import TensorProto, helper

    et = TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("Gather", ["features_in", "keep_idx"], ["features"], axis=0)], "keep_idx_gather",
        [helper.make_tensor_value_info("features_in", et, ["batch_in", width]),
         helper.make_tensor_value_info("keep_idx", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("features", et, ["batch", width])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def check_trt_gather(dev: Device, trt, rows: int = 64, width: int = 544, seed: int = 3) -> dict:
    """A TensorRT engine of the stage graphs' regroup (one Gather) on device-layer buffers, bit for bit."""
    rng = np.random.default_rng(seed)
    logger = trt.Logger(trt.Logger.WARNING)
    results, ok = {}, True
    with dev.bind_thread():
        runtime = trt.Runtime(logger)
        stream = dev.stream()
        for dtype in (np.float32, np.float16):
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(_gather_onnx(dtype, width)):
                raise RuntimeError("TensorRT cannot parse the gather graph: "
                                   + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
            config = builder.create_builder_config()
            prof = builder.create_optimization_profile()
            prof.set_shape("features_in", (1, width), (rows, width), (rows, width))
            prof.set_shape("keep_idx", (1,), (rows,), (rows + 8,))
            config.add_optimization_profile(prof)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise RuntimeError("TensorRT could not build the gather engine")
            engine = runtime.deserialize_cuda_engine(blob)
            ctx = engine.create_execution_context()
            feats = rng.normal(size=(rows, width)).astype(dtype)
            f_in, k_in = dev.pinned_empty(feats.shape, dtype), dev.pinned_empty((rows + 8,), np.int32)
            f_in[...] = feats
            d_f, d_k, d_o = dev.malloc(feats.nbytes), dev.malloc((rows + 8) * 4), dev.malloc((rows + 8) * width * feats.itemsize)
            try:
                dev.htod_async(d_f.ptr, f_in, stream)
                for case, keep in gather_cases(rows, rng).items():
                    if keep.size == 0:
                        continue  # TensorRT profiles start at batch 1; the pipeline never runs an empty group
                    n = keep.size
                    k_in[:n] = keep
                    dev.htod_async(d_k.ptr, k_in[:n], stream)
                    ctx.set_input_shape("features_in", (rows, width))
                    ctx.set_input_shape("keep_idx", (n,))
                    ctx.set_tensor_address("features_in", d_f.ptr)
                    ctx.set_tensor_address("keep_idx", d_k.ptr)
                    ctx.set_tensor_address("features", d_o.ptr)
                    if not ctx.execute_async_v3(dev.stream_handle(stream)):
                        raise RuntimeError("execute_async_v3 failed")
                    got = dev.pinned_empty((n, width), dtype)
                    dev.dtoh_async(got, d_o.ptr, stream)
                    dev.synchronize(stream)
                    same = _same_bits(np.array(got), feats[keep])
                    results[f"{np.dtype(dtype).name}/{case}"] = bool(same)
                    ok = ok and same
            finally:
                for b in (d_f, d_k, d_o):
                    b.free()
                ctx = engine = None
    return {"ok": bool(ok), "cases": results, "runner": f"TensorRT {trt.__version__} Gather engine", "impl": dev.impl}
