"""Will TensorRT's ONNX parser take this stage graph? An allow-list check done on the CPU, before any target.

The list is the ONNX-TensorRT operator support matrix (TensorRT 10.x, opset 9..24; TensorRT 11 keeps it), minus
the ops marked unsupported there. Q/DQ get the extra rule TensorRT states for them: zero points must be zero
(symmetric INT8). A graph that fails is reported with the op and the stage, before a Jetson ever sees it.
"""

from __future__ import annotations

from ..errors import DmpoEdgeError

__all__ = ["TENSORRT_OPS", "check_tensorrt_ops", "unsupported_ops"]

TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization
GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool
Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def unsupported_ops(model) -> list:
    """[(op_type, node name)] of nodes TensorRT cannot parse (custom domains count as unsupported)."""
    bad = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in TENSORRT_OPS:
            bad.append((n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}", n.name))
    return bad


def _nonzero_zero_points(model) -> list:
    from .._lazy import require

    numpy_helper = require("onnx.numpy_helper", "checking Q/DQ zero points")
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or not n.input[2]:
            continue
        zp = n.input[2]
        if zp in inits:
            arr = numpy_helper.to_array(inits[zp])
        elif zp in consts:
            arr = numpy_helper.to_array(next(a.t for a in consts[zp].attribute if a.name == "value"))
        else:
            bad.append((n.op_type, n.name, "zero point is computed at run time"))
            continue
        if arr.dtype.kind == "u" or (arr != 0).any():
            bad.append((n.op_type, n.name, f"zero point {arr.ravel()[:3].tolist()} ({arr.dtype})"))
    return bad


def check_tensorrt_ops(model, stage: int, what: str = "stage graph") -> None:
    """Raise a :class:`DmpoEdgeError` naming the first op (and the stage) that TensorRT cannot build."""
    bad = unsupported_ops(model)
    if bad:
        ops = sorted({b[0] for b in bad})
        raise DmpoEdgeError(
            f"stage {stage}",
            f"{what} uses op(s) {', '.join(ops)} (first node '{bad[0][1]}') that TensorRT's ONNX parser does not "
            "support. Change the model to avoid them (see the ONNX-TensorRT operator matrix)",
        )
    zps = _nonzero_zero_points(model)
    if zps:
        op, name, why = zps[0]
        raise DmpoEdgeError(
            f"stage {stage}", f"{what} has {op} '{name}' with {why}; TensorRT needs symmetric INT8 Q/DQ (zero point 0). "
            "Requantize with the symmetric (TensorRT) form",
        )
