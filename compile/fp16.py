"""FP16 stage graphs with explicit casts (strongly typed: TensorRT 10 and 11 build them without precision flags).

Mixed precision: the trunk runs in FP16; the exit score, and the whole exit head when it is a second-order one
(covariance pooling + Newton-Schulz square root: squared activations overflow FP16's 65504 and the iterated
matrix products amplify its rounding), stay in FP32. The converter is ModelOpt's AutoCast, which also keeps in
FP32 any node whose values on the calibration images exceed FP16's comfortable range; onnxconverter-common's
float16 converter with the same node block list is the fallback. ``features`` between stages are FP16.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import numpy as np

from .._lazy import available, require
from ..errors import DmpoEdgeError
from ._quiet import quiet_tools
from .graph import (
    descendants, ensure_node_names, force_output_types, load_model, save_model, set_float16_io, terminal_outputs,
)

__all__ = ["fp32_keep_nodes", "convert_fp16", "FP16_TOOLS"]

FP16_TOOLS = ("modelopt-autocast", "onnxconverter-common")


def fp32_keep_nodes(model, head_nodes, second_order: bool) -> tuple:
    """(node names to keep in FP32, why): the exit score always, the whole exit head when it is second-order.

    ``head_nodes``: the stage's exit-head region (:func:`dmpo_edge.compile.graph.exit_head_nodes`).
    """
    head = set(head_nodes)
    if second_order:
        return sorted(head), "second-order exit head (covariance / Newton-Schulz) and exit score"
    # a linear head is safe in FP16; keep only what follows the logits (softmax / score / argmax)
    return sorted(descendants(model, ["logits"]) & head), "exit score"


def _write_reference_batches(folder: str, feeds_list: list) -> str:
    # AutoCast's reference runner takes a folder of .npz files, one batch each (a single file would be split
    # into batches of one, which breaks keep_idx)
    os.makedirs(folder, exist_ok=True)
    for i, feeds in enumerate(feeds_list):
        np.savez(os.path.join(folder, f"batch_{i:03d}.npz"), **feeds)
    return folder


def _autocast(src: str, keep: list, feeds_list: list, opset: int):
    from modelopt.onnx.autocast import convert_to_mixed_precision

    tmp = tempfile.mkdtemp(prefix="dmpo-autocast-")
    try:
        data = _write_reference_batches(os.path.join(tmp, "ref"), feeds_list) if feeds_list else None
        import re

        extra = {} if data else {"data_max": float("inf")}  # no reference data: no range check (nothing to run)
        with quiet_tools():
            return convert_to_mixed_precision(
                src, low_precision_type="fp16", nodes_to_exclude=[f"^{re.escape(n)}$" for n in keep],
                keep_io_types=True, calibration_data=data, providers=["cpu"], opset=max(opset, 19), **extra,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converter_common(src: str, keep: list):
    from onnxconverter_common import float16

    model = terminal_outputs(load_model(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=list(keep),
                                                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST))


def convert_fp16(src: str, dst: str, head_nodes, second_order: bool, feeds_list: list, features_in: str | None,
                 features_out: str | None, opset: int, tool: str = "auto") -> dict:
    """Write the mixed-precision form of ``src`` to ``dst``; returns what ran and which nodes stayed FP32."""
    onnx = require("onnx", "fp16 conversion")
    model = ensure_node_names(load_model(src))
    save_model(model, dst)  # named copy: the tools select nodes by name
    keep, why = fp32_keep_nodes(model, head_nodes, second_order)
    order = list(FP16_TOOLS) if tool == "auto" else [tool]
    errors = []
    out = used = None
    for name in order:
        try:
            if name == "modelopt-autocast":
                if not (available("modelopt.onnx.autocast") and available("polygraphy")):
                    raise ImportError("modelopt.onnx.autocast (with onnx-graphsurgeon and polygraphy) is not installed")
                out = _autocast(dst, keep, feeds_list, opset)
            elif name == "onnxconverter-common":
                if not available("onnxconverter_common"):
                    raise ImportError("onnxconverter-common is not installed")
                out = _converter_common(dst, keep)
            else:
                raise ValueError(f"unknown fp16 tool '{name}'")
            used = name
            break
        except Exception as exc:  # try the next converter; report all when none works
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if out is None:
        raise DmpoEdgeError("fp16", "no FP16 converter worked (" + "; ".join(errors) + "). Install 'dmpo-edge[quant]'")
    set_float16_io(out, inputs=[features_in] if features_in else [], outputs=[features_out] if features_out else [])
    TP = onnx.TensorProto
    force_output_types(out, {"logits": TP.FLOAT, "confidence": TP.FLOAT, "prediction": TP.INT32})
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception:  # shape info is a nicety for viewers; the graph is complete without it
        pass
    save_model(out, dst)
    low = sum(1 for n in out.graph.node for a in n.attribute if n.op_type == "Cast" and a.name == "to" and a.i == 10)
    return {"tool": used, "fp32_nodes": len(keep), "fp32_reason": why, "casts_to_fp16": low, "fallback_errors": errors}
