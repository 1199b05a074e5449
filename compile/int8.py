"""INT8 stage graphs with explicit Q/DQ, calibrated on the target dataset on the CPU.

Two forms of every stage:

- ``stage_k.onnx`` for TensorRT: symmetric INT8 (zero points 0) activations and per-channel weights in Q/DQ
  form, from NVIDIA ModelOpt's ONNX quantizer (``modelopt.onnx.quantization.quantize``, calibrated with the
  CPU execution provider); ONNX Runtime's ``quantize_static`` in the same symmetric form is the fallback.
  TensorRT 10/11 build it strongly typed: no INT8 flag, no calibrator.
- ``stage_k.cpu.onnx`` for ONNX Runtime on the CPU: U8 asymmetric activations and S8 per-channel weights,
  QDQ or QOperator, whichever runs faster here (measured and recorded). The weights suit the CPU the bundle is
  compiled on (:mod:`dmpo_edge.cpu_isa`): on x86 without VNNI, where ONNX Runtime's U8 x S8 kernels saturate
  16-bit pair sums, U8 weights (U8U8 kernels) or 7-bit S8 weights, whichever measures better; full S8 elsewhere.

The TensorRT form is judged with its Q/DQ simulated in float (``onnxrun.SIMULATED_QDQ``), never with the host's
integer kernels: those differ from TensorRT on CPUs without VNNI. The CPU form is judged with the host's kernels,
which is what will run it.

Stage k is calibrated on what actually reaches it: the FP32 features of stage k-1 on the calibration images,
fed with ``keep_idx = arange``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

import numpy as np

from .._lazy import available, require
from ..errors import DmpoEdgeError
from ._quiet import quiet_tools
from .graph import ensure_node_names, load_model, save_model

__all__ = [
    "make_reader", "quantize_tensorrt_form", "quantize_cpu_form", "CALIB_METHODS",
    "CPU_FORMATS", "CPU_WEIGHT_SCHEMES", "apply_ranges", "cpu_weight_schemes", "cpu_weight_scheme", "batched_feeds", "image_layer_nodes",
]

#: activation range methods of the TensorRT form. ``entropy`` and ``max`` are the quantizer's own calibrators
#: (ModelOpt 0.47's ONNX INT8 path offers only these two); ``percentile-99.9``/``-99.99`` and ``mse`` take the ``max``
#: graph and set each activation's range from a histogram of |x| on the same calibration data (:func:`apply_ranges`).
#: ``percentile`` means ``percentile-99.99``. Measured side by side in benchmarks/int8_ranges.py.
CALIB_METHODS = ("entropy", "max", "percentile", "percentile-99.9", "percentile-99.99", "mse")
HISTOGRAM_BINS = 2048
CPU_FORMATS = ("QDQ", "QOperator")
#: weight schemes of the CPU form (activations are always U8 asymmetric per tensor)
CPU_WEIGHT_SCHEMES = {
    "s8": "int8 symmetric per channel",
    "s8-7bit": "int8 symmetric per channel, 7-bit range (no int16 saturation in U8 x S8 kernels without VNNI)",
    "u8": "uint8 asymmetric per channel (U8U8 kernels, no int16 saturation)",
}
# ops whose weights carry the work; quantizing only these keeps the CPU form accurate and fast
CPU_OPS = ["Conv", "MatMul", "Gemm"]


def batched_feeds(inputs: dict, batch: int = 32) -> list:
    """Split stage inputs ``{name: array}`` into feeds of at most ``batch`` rows, keep_idx = arange per batch."""
    data_names = [n for n in inputs if n != "keep_idx"]
    n = inputs[data_names[0]].shape[0]
    feeds = []
    for lo in range(0, n, batch):
        f = {name: np.ascontiguousarray(inputs[name][lo: lo + batch]) for name in data_names}
        if "keep_idx" in inputs:
            f["keep_idx"] = np.arange(f[data_names[0]].shape[0], dtype=np.int32)
        feeds.append(f)
    return feeds


def make_reader(feeds: list):
    """An ONNX Runtime CalibrationDataReader over prepared feeds (also has ModelOpt's ``get_first``)."""
    q = require("onnxruntime.quantization", "INT8 calibration")

    class FeedReader(q.CalibrationDataReader):
        def __init__(self, items):
            self.items = list(items)
            self._it = iter(self.items)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.items)

        def get_first(self):
            return self.items[0]

        def __len__(self):
            return len(self.items)

    return FeedReader(feeds)


@contextlib.contextmanager
def _ort_classes_restored():
    """ModelOpt patches ONNX Runtime's calibrator and quantizer classes in place (for good); put them back after
    each ModelOpt call so that ONNX Runtime's own quantize_static (the CPU form) works in the same process."""
    calibrate = require("onnxruntime.quantization.calibrate", "INT8 calibration")
    qdq = require("onnxruntime.quantization.qdq_quantizer", "INT8 calibration")
    base = require("onnxruntime.quantization.base_quantizer", "INT8 calibration")
    classes = [calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater, calibrate.HistogramCollector,
               calibrate.CalibraterBase, qdq.QDQQuantizer, base.BaseQuantizer]
    for extra in ("EntropyCalibrater", "PercentileCalibrater", "DistributionCalibrater"):
        if hasattr(calibrate, extra):
            classes.append(getattr(calibrate, extra))
    saved = [(c, dict(vars(c))) for c in classes]
    create = calibrate.create_calibrator
    try:
        yield
    finally:
        for cls, attrs in saved:
            now = vars(cls)
            for name in [n for n in now if n not in attrs and not n.startswith("__")]:
                delattr(cls, name)
            for name, val in attrs.items():
                if (not name.startswith("__") or name == "__init__") and now.get(name) is not val:
                    setattr(cls, name, val)
        calibrate.create_calibrator = create


def _ort_method(method: str):
    q = require("onnxruntime.quantization", "INT8 calibration")
    return {"entropy": q.CalibrationMethod.Entropy, "max": q.CalibrationMethod.MinMax}[method]


def _histogram_method(method: str) -> bool:
    return method == "mse" or method.startswith("percentile")


def _pick_amax(hist: np.ndarray, edges: np.ndarray, method: str) -> float:
    """The symmetric INT8 range of one activation from its |x| histogram (upper edge = the observed max)."""
    total = float(hist.sum())
    if total <= 0:
        return float(edges[-1])
    if method.startswith("percentile"):
        pct = 99.99 if method == "percentile" else float(method.split("-", 1)[1])
        idx = int(np.searchsorted(np.cumsum(hist) / total, pct / 100.0))
        return float(edges[min(idx + 1, len(edges) - 1)])
    # mse: the range that minimises the expected squared error of quantize -> dequantize (bin centres), the
    # clipping of the tail included
    centres = (edges[:-1] + edges[1:]) / 2
    cands = edges[-1] * np.linspace(0.1, 1.0, 181)
    steps = cands / 127.0
    q = np.minimum(np.rint(centres[None, :] / steps[:, None]), 127.0) * steps[:, None]
    err = ((centres[None, :] - q) ** 2 * hist[None, :]).sum(axis=1)
    return float(cands[int(np.argmin(err))])


def apply_ranges(qdq_path: str, fp32_path: str, feeds: list, method: str) -> int:
    """Rescale every activation Q/DQ of ``qdq_path`` (calibrated with ``max``) to ``method``'s range, measured on
    ``feeds`` through the FP32 graph ``fp32_path`` (same tensor names); returns how many were set.

    The ``max`` graph's scale gives each tensor's observed max, so one FP32 pass fills fixed-range histograms."""
    onnx = require("onnx", "INT8 ranges")
    from onnx import numpy_helper

    from .onnxrun import session

    m = load_model(qdq_path)
    inits = {i.name: i for i in m.graph.initializer}
    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    ref = load_model(fp32_path)
    known = {o for n in ref.graph.node for o in n.output} | {i.name for i in ref.graph.input}
    acts = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] in known and n.input[1] in inits:
            acts.setdefault(n.input[0], []).append(n)
    amax0 = {t: float(numpy_helper.to_array(inits[qs[0].input[1]]).max()) * 127.0 for t, qs in acts.items()}
    names = [t for t in acts if amax0[t] > 0]
    if not names:
        return 0
    have = {o.name for o in ref.graph.output}
    ref.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in names if t not in have)
    tmp = tempfile.mkdtemp(prefix="dmpo-ranges-")
    try:
        sess = session(save_model(ref, os.path.join(tmp, "probe.onnx")))
        hists = {t: np.zeros(HISTOGRAM_BINS, np.float64) for t in names}
        for f in feeds:
            for t, v in zip(names, sess.run(names, f)):
                a = np.abs(np.asarray(v, np.float32)).ravel()
                # exact zeros (ReLU) quantize without error at any range: left out, so that a mostly-zero tensor
                # does not get its percentile range squeezed onto the first bin
                a = np.minimum(a[a > 0], amax0[t])
                hists[t] += np.histogram(a, bins=HISTOGRAM_BINS, range=(0.0, amax0[t]))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = set()
    for t in names:
        edges = np.linspace(0.0, amax0[t], HISTOGRAM_BINS + 1)
        scale = np.float32(max(_pick_amax(hists[t], edges, method), 1e-12) / 127.0)
        for q in acts[t]:
            # the Q's scale and that of every DequantizeLinear reading its output
            for name in [q.input[1]] + [d.input[1] for d in users.get(q.output[0], []) if d.op_type == "DequantizeLinear"]:
                if name in done or name not in inits:
                    continue
                old = numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(numpy_helper.from_array(np.full(old.shape, scale, old.dtype), name))
                done.add(name)
    save_model(m, qdq_path)
    return len(names)


def _modelopt(src: str, dst: str, feeds: list, exclude: list, method: str) -> None:
    from modelopt.onnx.quantization import quantize

    with quiet_tools(), _ort_classes_restored():
        quantize(
            src, quantize_mode="int8", calibration_data_reader=make_reader(feeds),
            calibration_method="max" if method == "max" else "entropy", calibration_eps=["cpu"],
            high_precision_dtype="fp32", nodes_to_exclude=[f"^{re.escape(n)}$" for n in exclude] or None,
            output_path=dst, log_level="ERROR",
        )
    if not os.path.isfile(dst):
        raise RuntimeError("ModelOpt wrote no output")


def _ort_symmetric(src: str, dst: str, feeds: list, exclude: list, method: str) -> None:
    q = require("onnxruntime.quantization", "INT8 calibration")
    with quiet_tools():
        q.quantize_static(
            src, dst, make_reader(feeds), quant_format=q.QuantFormat.QDQ, op_types_to_quantize=CPU_OPS,
            per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            nodes_to_exclude=list(exclude), calibrate_method=_ort_method(method),
            # TensorRT: zero points 0, biases left in float (its DequantizeLinear takes INT8 only)
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "MatMulConstBOnly": True},
        )


@contextlib.contextmanager
def _named_copy(src: str, prefix: str):
    """Path of a temporary copy of ``src`` with every node named (the quantizers select nodes by name);
    removed on exit."""
    model = ensure_node_names(load_model(src))
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield save_model(model, os.path.join(tmp, "named.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_tensorrt_form(src: str, dst: str, feeds: list, exclude=(), method: str = "entropy", tool: str = "auto") -> str:
    """Symmetric INT8 Q/DQ form of ``src`` at ``dst``; returns the tool that ran."""
    if method not in CALIB_METHODS:
        raise DmpoEdgeError("int8", f"unknown calibration method '{method}'. Expected one of {', '.join(CALIB_METHODS)}")
    if _histogram_method(method):
        tool = quantize_tensorrt_form(src, dst, feeds, exclude, "max", tool)
        with _named_copy(src, "dmpo-int8r-") as named:
            apply_ranges(dst, named, feeds, method)
        return tool
    with _named_copy(src, "dmpo-int8-") as named:
        order = ["modelopt", "onnxruntime"] if tool == "auto" else [tool]
        errors = []
        for name in order:
            try:
                if name == "modelopt":
                    if not available("modelopt.onnx.quantization"):
                        raise ImportError("modelopt.onnx.quantization (nvidia-modelopt with onnx-graphsurgeon) is not importable")
                    _modelopt(named, dst, feeds, list(exclude), method)
                elif name == "onnxruntime":
                    _ort_symmetric(named, dst, feeds, list(exclude), method)
                else:
                    raise ValueError(f"unknown INT8 tool '{name}'")
                return name
            except Exception as exc:  # fall back to the next quantizer, report all if none works
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise DmpoEdgeError("int8", "no INT8 quantizer worked (" + "; ".join(errors) + "). Install 'dmpo-edge[quant]'")


def cpu_weight_schemes(isa=None) -> tuple:
    """The weight schemes the CPU form may take on ``isa`` (default: this host), preferred first.

    Where ONNX Runtime's U8 x S8 kernels saturate (x86 without VNNI): U8 weights (U8U8 kernels widen to 16 bits
    before multiplying: no saturation, full 8-bit resolution) or 7-bit S8 weights (ONNX Runtime's ``reduce_range``).
    Measured on the digits test model, stage 3 alone: U8U8 agreed with FP32 on 92.7% of the images, 7-bit S8 on
    82.7%, full S8 on 83.3% with this AVX2 host's kernels (89.3% with Q/DQ simulated: saturation cost the rest).
    Elsewhere full-range S8 weights: the kernels accumulate in 32 bits."""
    from ..cpu_isa import detect

    isa = isa or detect()
    return ("u8", "s8-7bit") if isa["saturates_u8s8"] else ("s8",)


def cpu_weight_scheme(isa=None) -> str:
    """The preferred weight scheme of the CPU form on ``isa`` (default: this host)."""
    return cpu_weight_schemes(isa)[0]


def quantize_cpu_form(src: str, dst: str, feeds: list, exclude=(), fmt: str = "QDQ", method: str = "max",
                      weights: str | None = None) -> dict:
    """U8-activation form for ONNX Runtime's CPU kernels (QDQ or QOperator) at ``dst``; returns its scheme.

    ``weights``: ``s8`` (full-range S8, per channel), ``s8-7bit`` (``reduce_range``: no int16 saturation on x86
    without VNNI) or ``u8`` (U8U8: 16-bit products, also saturation-free there); default: this host's preferred
    scheme (:func:`cpu_weight_schemes`). Activation ranges are always MinMax (``method`` is accepted for the
    call's symmetry): asymmetric U8 spends its 256 levels on the observed range.
    """
    q = require("onnxruntime.quantization", "INT8 CPU form")
    if fmt not in CPU_FORMATS:
        raise DmpoEdgeError("int8", f"unknown CPU format '{fmt}'. Expected one of {', '.join(CPU_FORMATS)}")
    weights = weights or cpu_weight_scheme()
    if weights not in CPU_WEIGHT_SCHEMES:
        raise DmpoEdgeError("int8", f"unknown CPU weight scheme '{weights}'. Expected one of {', '.join(CPU_WEIGHT_SCHEMES)}")
    with _named_copy(src, "dmpo-int8cpu-") as named, quiet_tools():
        q.quantize_static(
            named, dst, make_reader(feeds),
            quant_format=q.QuantFormat.QDQ if fmt == "QDQ" else q.QuantFormat.QOperator,
            op_types_to_quantize=CPU_OPS, per_channel=True, activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QUInt8 if weights == "u8" else q.QuantType.QInt8,
            reduce_range=weights == "s8-7bit", nodes_to_exclude=list(exclude),
            calibrate_method=_ort_method("max"),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": weights != "u8", "MatMulConstBOnly": True},
        )
    return {"format": fmt, "weights": weights, "description": CPU_WEIGHT_SCHEMES[weights]}


def image_layer_nodes(model, image_input: str = "input") -> list:
    """The first weighted layers reading the image (stage 0's stem): they stay FP32 in the CPU form.

    Per-tensor U8 of a normalised 3-channel image and its first convolution are coarse, and the error they add
    is carried through every later stage; measured on the digits model it costs the last exit ~3 points.
    """
    if image_input not in {i.name for i in model.graph.input}:
        return []
    cons = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    out, seen, front = [], set(), [image_input]
    while front:
        t = front.pop()
        for n in cons.get(t, []):
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in CPU_OPS:
                out.append(n.name)
            else:
                front.extend(o for o in n.output if o)
    return out
