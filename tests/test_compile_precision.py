"""The precision tools one stage at a time, including the fallbacks used when ModelOpt is not installed:
ONNX Runtime's quantize_static in the symmetric (TensorRT) form and onnxconverter-common's FP16 converter."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from dmpo_edge.compile.graph import ensure_node_names, exit_head_nodes, is_second_order_head, load_model  # noqa: E402
from dmpo_edge.compile.int8 import (  # noqa: E402
    batched_feeds, cpu_weight_scheme, image_layer_nodes, quantize_cpu_form, quantize_tensorrt_form,
)
from dmpo_edge.cpu_isa import detect  # noqa: E402
from dmpo_edge.compile.onnxrun import run_chain, session  # noqa: E402
from dmpo_edge.compile.opcheck import check_tensorrt_ops  # noqa: E402


@pytest.fixture(scope="module")
def fp32(tiny_bundle_factory):
    from dmpo_edge.calib.datasets import load_dataset

    b = tiny_bundle_factory("fp32")
    x = b.preprocess(load_dataset("digits:train").take(64).images)
    paths = [b.stage_path(k) for k in range(b.num_stages)]
    return b, paths, run_chain(paths, x, collect_inputs=True)


def _stage1_feeds(chain):
    f = chain[1]["input"]
    return batched_feeds({"features_in": f, "keep_idx": np.arange(len(f), dtype=np.int32)}, 32)


def _agreement(a, b, feeds, simulate_qdq=False):
    """Top-1 agreement of graph ``b`` with FP32 graph ``a``; ``simulate_qdq``: ``b`` as TensorRT computes it."""
    sa, sb = session(a), session(b, simulate_qdq=simulate_qdq)
    return float(np.mean(np.concatenate([sa.run(["prediction"], f)[0] == sb.run(["prediction"], f)[0] for f in feeds])))


def test_onnxruntime_fallback_gives_the_tensorrt_form(fp32, tmp_path):
    _, paths, chain = fp32
    feeds = _stage1_feeds(chain)
    dst = str(tmp_path / "s1.int8.onnx")
    assert quantize_tensorrt_form(paths[1], dst, feeds, tool="onnxruntime", method="max") == "onnxruntime"
    m = onnx.load(dst)
    zps = [numpy_helper.to_array(i) for i in m.graph.initializer if "zero_point" in i.name]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    check_tensorrt_ops(m, 1)  # biases stay float, zero points 0: TensorRT takes it
    # judged as TensorRT computes it (32-bit accumulation), not with this host's integer kernels
    assert _agreement(paths[1], dst, feeds, simulate_qdq=True) >= 0.8


def test_head_kept_fp32_by_name(fp32, tmp_path):
    """Excluded nodes (the exit head when INT8 hurts it) get no Q/DQ; the trunk still does."""
    _, paths, chain = fp32
    m = ensure_node_names(load_model(paths[1]))
    head = exit_head_nodes(m, "features")
    assert is_second_order_head(m, head)
    dst = str(tmp_path / "s1.headfp32.onnx")
    quantize_tensorrt_form(paths[1], dst, _stage1_feeds(chain), exclude=sorted(head))
    q = onnx.load(dst)
    prod = {o: n for n in q.graph.node for o in n.output}
    in_head = [n for n in q.graph.node if n.name in head and n.op_type in ("Conv", "MatMul", "Gemm")]
    assert in_head and not any(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear"
                               for n in in_head for i in n.input)
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)


def test_cpu_form_keeps_the_image_layer_fp32(fp32, tmp_path):
    b, paths, chain = fp32
    m = ensure_node_names(load_model(paths[0]))
    stem = image_layer_nodes(m)
    assert stem and all(n.op_type == "Conv" for n in m.graph.node if n.name in stem)
    feeds = batched_feeds({"input": chain[0]["input"]}, 32)
    dst = str(tmp_path / "s0.cpu.onnx")
    rec = quantize_cpu_form(paths[0], dst, feeds, stem, "QDQ", "max")
    # no full-range S8 weights where this CPU's U8 x S8 kernels saturate: U8 weights (U8U8 kernels) there
    assert rec["weights"] == cpu_weight_scheme() == ("u8" if detect().saturates else "s8")
    q = onnx.load(dst)
    first = next(n for n in q.graph.node if n.op_type == "Conv" and "input" in n.input)
    assert first.name in stem  # still reads the float image, no QuantizeLinear in front
    w_type = onnx.TensorProto.UINT8 if rec["weights"] == "u8" else onnx.TensorProto.INT8
    conv_w = [i for i in q.graph.initializer if i.data_type == w_type and i.dims and len(i.dims) == 4]
    assert conv_w, "quantized convolution weights of the scheme's type"
    # measured with this host's own integer kernels: what will run the CPU form here
    assert _agreement(paths[0], dst, feeds) >= 0.8


def test_onnxconverter_fallback_fp16(fp32, tmp_path):
    from dmpo_edge.compile.fp16 import convert_fp16

    _, paths, chain = fp32
    m = ensure_node_names(load_model(paths[1]))
    head = exit_head_nodes(m, "features")
    dst = str(tmp_path / "s1.fp16.onnx")
    rec = convert_fp16(paths[1], dst, sorted(head), True, [], "features_in", "features", 18, tool="onnxconverter-common")
    assert rec["tool"] == "onnxconverter-common" and rec["fp32_nodes"] == len(head)
    onnx.checker.check_model(dst)
    sess = session(dst)
    types = {i.name: i.type for i in sess.get_inputs()} | {o.name: o.type for o in sess.get_outputs()}
    assert types["features_in"] == types["features"] == "tensor(float16)"
    assert types["logits"] == types["confidence"] == "tensor(float)"
    f = chain[1]["input"]
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"features_in": f.astype(np.float16), "keep_idx": np.arange(len(f), dtype=np.int32)})))
    ref = session(paths[1]).run(["prediction"], {"features_in": f, "keep_idx": np.arange(len(f), dtype=np.int32)})[0]
    assert (out["prediction"] == ref).mean() >= 0.97
