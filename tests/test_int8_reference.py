"""The faithful INT8 reference and the saturation it avoids.

TensorRT multiplies INT8 by INT8 and accumulates in 32 bits. ONNX Runtime's x86 kernels without VNNI add pairs of
U8 x S8 products into saturating 16-bit sums (``vpmaddubsw``), so on such CPUs a Q/DQ graph run with its integer
kernels is not what TensorRT computes. These tests pin (1) that the simulated Q/DQ session computes exactly the numpy
quantize-dequantize result, on any CPU, (2) that the integer kernels really differ on CPUs whose ISA we classify as
saturating, and (3) that the 7-bit weights the CPU form gets there do not saturate.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dmpo_edge.compile.onnxrun import session  # noqa: E402
from dmpo_edge.cpu_isa import detect, from_flags, mismatch_warning  # noqa: E402

K, N, M = 64, 16, 8


def _qdq_matmul(path, w_q, x_scale=1.0, w_scale=1.0, act=TensorProto.UINT8, w_zp=0):
    """x -> Q -> DQ -> MatMul(DQ(w_q)) -> y: the shape ONNX Runtime fuses into an integer GEMM."""
    zp = np.array(0, np.uint8 if act == TensorProto.UINT8 else np.int8)
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "x_s"), numpy_helper.from_array(zp, "x_zp"),
             numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(np.asarray(w_scale, np.float32), "w_s"),
             numpy_helper.from_array(np.full(np.shape(w_scale), w_zp, w_q.dtype), "w_zp")]
    wdq = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["wd"], name="wdq",
                           **({"axis": 1} if np.ndim(w_scale) else {}))
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"], name="dq"), wdq,
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w_q.shape[1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return str(path)


def _numpy_qdq(x, scale, lo, hi):
    return np.clip(np.rint(x / scale), lo, hi) * scale


def test_saturating_layer_simulated_exactly_and_integer_kernels_differ_without_vnni(tmp_path):
    # Every U8 activation at 255 against S8 weights of 127: each pair sums to 64,770 > 32,767.
    w = np.full((K, N), 127, np.int8)
    w[::3] = -128
    x = np.full((M, K), 255.0, np.float32)
    x[1] = np.arange(K) * 4.0  # and a row that stays in range (clipped at 255 by Q)
    path = _qdq_matmul(tmp_path / "sat.onnx", w)
    # numbers chosen so that float32 arithmetic is exact (integers < 2**24): the reference must match bit for bit
    expected = (_numpy_qdq(x.astype(np.float64), 1.0, 0, 255) @ w.astype(np.float64)).astype(np.float32)
    simulated = session(path, simulate_qdq=True).run(None, {"x": x})[0]
    np.testing.assert_array_equal(simulated, expected)

    integer = session(path).run(None, {"x": x})[0]
    host = detect()
    if not host.saturates:
        pytest.skip(f"{host.name}: ONNX Runtime's U8 x S8 kernels accumulate in 32 bits here (VNNI / Arm)")
    assert not np.array_equal(integer, expected), "expected int16 saturation in ONNX Runtime's kernels on " + host.name
    assert np.abs(integer - expected).max() > 1e5


def test_seven_bit_weights_do_not_saturate_on_any_cpu(tmp_path):
    """The CPU form's weights on x86 without VNNI: |w| <= 64, so 255 x 64 x 2 fits in int16."""
    w = np.full((K, N), 63, np.int8)
    w[::2] = -64
    x = np.full((M, K), 255.0, np.float32)
    path = _qdq_matmul(tmp_path / "w7.onnx", w)
    expected = (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(session(path).run(None, {"x": x})[0], expected)


def test_u8_weights_do_not_saturate_on_any_cpu(tmp_path):
    """The CPU form's other scheme there: U8 weights (zero point 128), full 8-bit range, U8U8 kernels."""
    w = np.full((K, N), 255, np.uint8)
    w[::2] = 0
    x = np.full((M, K), 255.0, np.float32)
    path = _qdq_matmul(tmp_path / "u8.onnx", w, w_zp=128)
    expected = (x.astype(np.float64) @ (w.astype(np.float64) - 128)).astype(np.float32)
    np.testing.assert_array_equal(session(path).run(None, {"x": x})[0], expected)
    np.testing.assert_array_equal(session(path, simulate_qdq=True).run(None, {"x": x})[0], expected)


def test_simulation_is_numpy_quantize_dequantize_of_a_real_layer(tmp_path):
    """Real-valued scales, symmetric S8 activations and per-channel weights (the TensorRT form): the simulated
    session equals numpy's quantize -> dequantize -> float MatMul up to float32 summation order."""
    rng = np.random.default_rng(0)
    wf = rng.normal(0, 0.2, size=(K, N)).astype(np.float32)
    w_scale = (np.abs(wf).max(axis=0) / 127.0).astype(np.float32)
    w_q = np.clip(np.rint(wf / w_scale), -128, 127).astype(np.int8)
    x = rng.normal(0, 1.5, size=(256, K)).astype(np.float32)
    x_scale = np.float32(4.0 / 127.0)  # calibrated at |x| <= 4: some values clip, as in a real stage
    path = _qdq_matmul(tmp_path / "real.onnx", w_q, x_scale, w_scale, act=TensorProto.INT8)
    xd = _numpy_qdq(x, x_scale, -128, 127).astype(np.float32)
    expected = xd @ (w_q.astype(np.float32) * w_scale)
    got = session(path, simulate_qdq=True).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # and clipping happened: the reference is not just the float layer
    assert np.abs(x).max() > 4.0 and not np.allclose(got, x @ wf, atol=1e-3)


@pytest.mark.parametrize("machine,flags,isa,cls,sat", [
    ("x86_64", "fpu sse2 avx avx2 fma", "avx2", "x86-novnni", True),
    ("x86_64", "avx2 avx512f avx512bw avx512vl", "avx512", "x86-novnni", True),
    ("x86_64", "avx2 avx512f avx512bw avx512_vnni", "avx512_vnni", "x86-vnni", False),
    ("x86_64", "avx2 avx_vnni", "avx_vnni", "x86-vnni", False),
    ("aarch64", "fp asimd asimddp", "arm_dotprod", "arm", False),
    ("aarch64", "fp asimd asimddp i8mm", "arm_i8mm", "arm", False),
    ("riscv64", "", "unknown", "unknown", True),
])
def test_isa_classes(machine, flags, isa, cls, sat):
    got = from_flags(machine, flags.split())
    assert (got.name, got.isa_class, got.saturates) == (isa, cls, sat)


def test_warning_only_across_isa_classes():
    vnni = from_flags("x86_64", ["avx2", "avx512f", "avx512bw", "avx512_vnni"])
    avx2 = from_flags("x86_64", ["avx2"])
    avx512 = from_flags("x86_64", ["avx2", "avx512f", "avx512bw"])
    assert mismatch_warning(dict(avx2), avx512) is None  # same class: same kernels' behaviour
    line = mismatch_warning(dict(vnni), avx2)
    assert line.startswith("WARNING cpu form | quantized for avx512_vnni") and "saturate" in line and "\n" not in line
    assert "7-bit" in mismatch_warning(dict(avx2), vnni)
    assert mismatch_warning(None, avx2) is None


def test_budget_per_exit_and_form():
    """The per-exit budget on real arrays: accuracy drop with labels, disagreement without; one error line naming
    every exit over it and the forms within it."""
    from dmpo_edge.compile.report import budget_error, precision_report

    y = np.arange(200) % 10
    ref = [{"prediction": y.copy(), "logits": np.zeros((200, 10)), "confidence": np.ones(200)} for _ in range(2)]
    worse = [dict(r, prediction=r["prediction"].copy()) for r in ref]
    worse[1]["prediction"][:2] = (worse[1]["prediction"][:2] + 1) % 10  # exit 1 loses 2 of 200 images: 1 point
    rep = precision_report(ref, {"int8": ref, "int8-cpu": worse}, y, {"source": "digits:test"},
                           {"int8": "simulated", "int8-cpu": "host"}, max_exit_drop=0.5)
    assert rep["misses"] == [{"variant": "int8-cpu", "exit": 1, "points": 1.0}] and not rep["ok"]
    assert [e["budget_points"] for e in rep["variants"]["int8"]] == [0.0, 0.0]
    msg = str(budget_error(rep, "int8"))
    assert msg.startswith("compile | int8 loses more than 0.5 accuracy points at int8-cpu exit 1 1.00 on digits:test "
                          "(int8 within it at every exit); nothing was written.") and "--accept-drop" in msg
    assert precision_report(ref, {"int8-cpu": worse}, y, None, max_exit_drop=1.0)["ok"]  # at the budget is within it
    unlabelled = precision_report(ref, {"int8-cpu": worse}, None, None, max_exit_drop=0.5)
    assert unlabelled["misses"] == [{"variant": "int8-cpu", "exit": 1, "points": 1.0}]
    assert "disagreement" in str(budget_error(unlabelled, "int8"))
