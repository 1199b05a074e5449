"""The survivor regroup on the device, bit for bit against numpy: the ``keep_idx`` gather that opens every stage
k > 0 graph, run by torch (``index_select`` on CUDA over the device layer's own memory and stream) and by a
one-node TensorRT ``Gather`` engine bound to device-layer buffers."""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from dmpo_edge.runtime.device import Device, DeviceBuffer

from .host_device import same_bits

__all__ = ["gather_cases", "check_gather", "check_trt_gather"]


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
                    same = same_bits(got, feats[keep])
                    results[f"{np.dtype(dtype).name}/{case}"] = bool(same)
                    ok = ok and same
            finally:
                buf.free()
        if cuda:
            dev.synchronize(stream)  # torch's work on the external stream is done before the stream goes
        dev.destroy_stream(stream)
    return {"ok": bool(ok), "cases": results, "runner": "torch.index_select on " + ("cuda" if cuda else "cpu"),
            "impl": dev.impl}



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
                    same = same_bits(np.array(got), feats[keep])
                    results[f"{np.dtype(dtype).name}/{case}"] = bool(same)
                    ok = ok and same
            finally:
                for b in (d_f, d_k, d_o):
                    b.free()
                ctx = engine = None
        dev.destroy_stream(stream)
    return {"ok": bool(ok), "cases": results, "runner": f"TensorRT {trt.__version__} Gather engine", "impl": dev.impl}
