"""The peer one-graph model: what a user would deploy instead of early exit, written into every bundle.

The same tuned model without early exits (every trunk segment + the final exit, LoRA folded, no early exit
heads), exported as one graph in the bundle's precision, with the settings a user would take for one graph:
FP16 and INT8 by the same tools as the stages, INT8 calibrated on the same images, and for ONNX Runtime on
the CPU the fastest of FP32 and the two U8 forms (QDQ / QOperator) that keeps within the CPU accuracy budget,
chosen by the stages' rule. ``bench``
times it in the same interleaved run as the early-exit pipeline: its speed-up over the peer is the figure
that says whether early exit pays against what users would run instead.
"""

from __future__ import annotations

import os

import numpy as np

from .._lazy import require
from .export import check_model, export_stage, simplify
from .graph import drop_output, ensure_node_names, exit_head_nodes, io_specs, is_second_order_head, load_model, save_model
from .stages import make_peer_module

__all__ = ["PEER_FILE", "PEER_CPU_FILE", "export_peer", "peer_precision", "peer_accuracy", "peer_entry"]

PEER_FILE = "peer.onnx"
PEER_CPU_FILE = "peer.cpu.onnx"


def export_peer(model, policy: str, x: np.ndarray, path: str, opset: int, exporter: str) -> dict:
    """Export the peer of ``model`` (already merged, eval) to ``path``; returns its exit-head record and tools."""
    torch = require("torch", "exporting the peer model")
    mod = make_peer_module(model, policy, probe=True)
    args = (torch.from_numpy(x[: min(4, len(x))]),)
    used = export_stage(mod, args, path, opset=opset, exporter=exporter)
    simp = simplify(path)
    m = ensure_node_names(load_model(path))
    head = exit_head_nodes(m, mod.io.trunk_output)
    second = is_second_order_head(m, head)
    drop_output(m, mod.io.trunk_output)
    check_model(m, where="peer model")
    save_model(m, path)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        make_peer_module(model, policy)(args[0][:1])
    return {"head_nodes": sorted(head), "second_order": second, "exporter": used, "simplifier": simp,
            "flops": float(counter.get_total_flops())}


def _image_feeds(x, batch: int = 32) -> list:
    return [{"input": np.ascontiguousarray(x[i:i + batch])} for i in range(0, len(x), batch)]


def peer_accuracy(path: str, x: np.ndarray, labels) -> dict:
    """Top-1 accuracy (or predictions only, without labels) of a peer graph on ``x``, ONNX Runtime on the CPU."""
    from .onnxrun import session

    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    preds = np.concatenate([dict(zip(names, sess.run(None, f)))["prediction"] for f in _image_feeds(x, 64)])
    out = {"prediction": preds.astype(np.int64)}
    if labels is not None:
        out["accuracy"] = float((out["prediction"] == np.asarray(labels, np.int64)).mean())
    return out


def peer_precision(precision: str, fp32_path: str, info: dict, out_dir: str, data, opset: int, calib_method: str,
                   fp16_tool: str, int8_tool: str, cpu_format: str, drop_points: float, keep_image_layer: bool) -> dict:
    """The peer in the bundle's precision: ``{"file", "cpu_file" (or None), "record"}`` (paths in ``out_dir``)."""
    if precision == "fp32":
        return {"file": fp32_path, "cpu_file": None, "record": {"mode": "fp32"}}
    calib_x = data.calib_x if data.calib_x is not None else data.holdout_x
    feeds = _image_feeds(calib_x[:256]) if calib_x is not None else []
    if precision == "fp16":
        from .fp16 import convert_fp16

        dst = os.path.join(out_dir, "peer.fp16.onnx")
        rec = convert_fp16(fp32_path, dst, info["head_nodes"], info["second_order"], feeds[:4], features_in=None,
                           features_out=None, opset=opset, tool=fp16_tool)
        check_model(dst, where="fp16 peer model")
        return {"file": dst, "cpu_file": None, "record": {"mode": "fp16", "tool": rec["tool"], "fp32_nodes": rec["fp32_nodes"]}}
    from .int8 import CPU_FORMATS, image_layer_nodes, quantize_cpu_form, quantize_tensorrt_form

    # the same layers as the stages keep FP32: a second-order final head; the image layer in the CPU form
    head = list(info["head_nodes"]) if info["second_order"] else []
    dst = os.path.join(out_dir, "peer.int8.onnx")
    tool = quantize_tensorrt_form(fp32_path, dst, feeds, head, calib_method, int8_tool)
    stem = image_layer_nodes(load_model(fp32_path)) if keep_image_layer else []
    formats = list(CPU_FORMATS) if cpu_format == "auto" else [cpu_format]
    made, cands = {}, {}
    for fmt in formats:
        p = os.path.join(out_dir, f"peer.{fmt}.cpu.onnx")
        try:
            quantize_cpu_form(fp32_path, p, feeds, sorted(set(head) | set(stem)), fmt, calib_method)
            made[fmt] = p
        except Exception as exc:  # a form ORT cannot produce for this graph is skipped; the other may work
            cands[fmt] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    rec = {"mode": "int8", "tool": tool, "fp32_nodes": len(head), "cpu_fp32_nodes": len(set(head) | set(stem))}
    # FP32 is a candidate too, timed in the same rounds at batch 1 and at the calibration batch and chosen by the
    # same rule as each stage's form (stage_forms.choose_form): a user who quantizes one graph and finds the U8
    # form slower keeps FP32, so the peer is never slower than the FP32 one. (On an AVX2 CPU the QDQ form of the
    # whole EfficientNet-Lite0 ran 8x slower than FP32: its early depthwise layers do not fuse into U8 kernels.)
    from .stage_forms import TIMING_BATCHES, choose_form, time_forms

    timing = feeds[0] if feeds else None
    timed = {"fp32": fp32_path, **made}
    ms = time_forms(timed, timing, TIMING_BATCHES) if timing is not None else {f: {} for f in timed}
    hold = data.holdout_x
    ref = peer_accuracy(fp32_path, hold, data.holdout_y) if hold is not None else None
    cands["fp32"] = {"ms_by_batch": ms["fp32"], "drop_points": 0.0}
    for fmt, p in made.items():
        c = {"ms_by_batch": ms[fmt]}
        if ref is not None:
            got = peer_accuracy(p, hold, data.holdout_y)
            c["drop_points"] = (100.0 * (ref["accuracy"] - got["accuracy"]) if "accuracy" in ref
                                else 100.0 * float((got["prediction"] != ref["prediction"]).mean()))
        cands[fmt] = c
    drops = {f: c.get("drop_points", 0.0) for f, c in cands.items() if "error" not in c}
    chosen, why = choose_form({f: ms[f] for f in timed}, drops, drop_points) if timing is not None else ("fp32", "not timed")
    rec.update({"cpu_candidates": cands, "timing_batches": sorted(ms["fp32"]), "cpu_format": chosen, "cpu_choice": why})
    return {"file": dst, "cpu_file": timed[chosen], "record": rec}


def peer_entry(bundle_dir: str, made: dict, info: dict) -> dict:
    """Copy the peer graph(s) into the bundle; the manifest's ``peer`` entry (files, checksums, I/O, FLOPs)."""
    import shutil

    from ..bundle import sha256_file

    shutil.copyfile(made["file"], os.path.join(bundle_dir, PEER_FILE))
    ins, outs = io_specs(load_model(made["file"]))
    entry = {"file": PEER_FILE, "sha256": sha256_file(os.path.join(bundle_dir, PEER_FILE)), "inputs": ins, "outputs": outs,
             "flops": info["flops"], "what": "one graph: every trunk segment and the final exit, no early exit heads, "
             "LoRA folded; the static model users would run instead of early exit",
             "precision": made["record"], "exporter": info["exporter"], "simplifier": info["simplifier"]}
    if made.get("cpu_file"):
        shutil.copyfile(made["cpu_file"], os.path.join(bundle_dir, PEER_CPU_FILE))
        entry["variants"] = {"cpu": {"file": PEER_CPU_FILE, "sha256": sha256_file(os.path.join(bundle_dir, PEER_CPU_FILE)),
                                     "format": made["record"]["cpu_format"]}}
    return entry
