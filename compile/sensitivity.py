"""Layer-wise INT8 sensitivity: the accuracy each exit loses when only one layer of a stage is quantized.

Where an INT8 form misses the accuracy budget, this says which layers cost it. For every quantized layer of a
stage's Q/DQ graph (a node fed by DequantizeLinear), the FP32 stage graph gets exactly that layer's Q/DQ (same
scales, same INT8 weights, taken from the quantized graph); the stage then runs with the later stages in FP32 on
the held-out data, and the drop at each exit k..K-1 is recorded. The TensorRT form is run as TensorRT computes it
(Q/DQ simulated in float), a CPU form with this host's kernels.

Each layer costs one pass of the held-out images through stages k..K-1, so compile runs this only when an INT8
bundle misses its budget (with ``--accept-drop``) or when asked (``--sensitivity``).
"""

from __future__ import annotations

import os

from .graph import ensure_node_names, load_model, save_model

__all__ = ["single_layer_graphs", "stage_sensitivity", "sensitivity_report"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _block_of(name: str) -> str:
    """The module path a layer belongs to (``/trunk/blocks.3/conv_pw/Conv`` -> ``/trunk/blocks.3``)."""
    parts = [p for p in name.split("/") if p]
    return "/" + "/".join(parts[:2]) if len(parts) > 2 else name


def single_layer_graphs(fp32_path: str, qdq_path: str, out_dir: str) -> list:
    """``[(layer name, op type, path)]``: the FP32 graph with only that layer's Q/DQ inserted, for every layer of
    ``qdq_path`` fed by a DequantizeLinear whose name and op type also exist in the FP32 graph."""
    onnx = __import__("onnx")
    helper = onnx.helper
    q = load_model(qdq_path)
    base = ensure_node_names(load_model(fp32_path))
    fp32_nodes = {n.name: n for n in base.graph.node}
    prod = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: i for i in q.graph.initializer}
    out = []
    os.makedirs(out_dir, exist_ok=True)
    for node in q.graph.node:
        if node.op_type in _QDQ or node.name not in fp32_nodes or fp32_nodes[node.name].op_type != node.op_type:
            continue
        fed = [(i, prod[t]) for i, t in enumerate(node.input) if t in prod and prod[t].op_type == "DequantizeLinear"]
        if not fed:
            continue
        m = onnx.ModelProto()
        m.CopyFrom(base)
        target = next(n for n in m.graph.node if n.name == node.name)
        new_nodes, new_inits = [], []
        ok = True
        for i, dq in fed:
            tag = f"{node.name}.in{i}"
            params = []
            for j, t in enumerate(dq.input[1:], start=1):  # scale, zero point
                if t not in inits:
                    ok = False
                    break
                init = onnx.TensorProto()
                init.CopyFrom(inits[t])
                init.name = f"{tag}.qparam{j}"
                new_inits.append(init)
                params.append(init.name)
            if not ok:
                break
            axis = [a for a in dq.attribute if a.name == "axis"]
            kwargs = {"axis": axis[0].i} if axis else {}
            src = dq.input[0]
            if src in inits:  # a weight: the quantized graph's INT8 values, dequantized in place
                w = onnx.TensorProto()
                w.CopyFrom(inits[src])
                w.name = f"{tag}.int8"
                new_inits.append(w)
                new_nodes.append(helper.make_node("DequantizeLinear", [w.name] + params, [f"{tag}.dq"],
                                                  name=f"{tag}.DequantizeLinear", **kwargs))
            else:  # an activation: quantize-dequantize the FP32 graph's own tensor with the calibrated scale
                qn = prod.get(src)
                qaxis = [a for a in qn.attribute if a.name == "axis"] if qn is not None else []
                new_nodes.append(helper.make_node("QuantizeLinear", [target.input[i]] + params, [f"{tag}.q"],
                                                  name=f"{tag}.QuantizeLinear",
                                                  **({"axis": qaxis[0].i} if qaxis else kwargs)))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q"] + params, [f"{tag}.dq"],
                                                  name=f"{tag}.DequantizeLinear", **kwargs))
            target.input[i] = f"{tag}.dq"
        if not ok:
            continue
        # topological order: the new nodes go right before the layer they feed
        nodes = list(m.graph.node)
        at = next(j for j, n in enumerate(nodes) if n.name == node.name)
        del m.graph.node[:]
        m.graph.node.extend(nodes[:at] + new_nodes + nodes[at:])
        m.graph.initializer.extend(new_inits)
        path = os.path.join(out_dir, f"layer_{len(out)}.onnx")
        save_model(m, path)
        out.append((node.name, node.op_type, path))
    return out


def stage_sensitivity(k: int, fp32_path: str, qdq_path: str, score, scratch: str, simulate_qdq: bool) -> list:
    """Per layer of stage ``k``: ``{"layer", "op", "block", "exit_drop_points": {exit: points}, "worst_points"}``,
    most costly first. ``score(k, path, simulate_qdq)`` runs a stage-k candidate against FP32 (``_Downstream``)."""
    rows = []
    for name, op, path in single_layer_graphs(fp32_path, qdq_path, os.path.join(scratch, f"sens_{k}")):
        res = score(k, path, simulate_qdq=simulate_qdq)
        drops = res["exit_drop_points"]
        rows.append({"layer": name, "op": op, "block": _block_of(name),
                     "exit_drop_points": {str(k + j): round(d, 3) for j, d in enumerate(drops)},
                     "worst_points": round(max(drops), 3)})
        os.remove(path)
    rows.sort(key=lambda r: -r["worst_points"])
    return rows


def _blocks(rows: list) -> list:
    """Layers grouped by block: the worst single layer and the sum of worst drops (a rough, additive view)."""
    agg = {}
    for r in rows:
        b = agg.setdefault(r["block"], {"block": r["block"], "layers": 0, "worst_points": float("-inf"), "sum_points": 0.0})
        b["layers"] += 1
        b["worst_points"] = max(b["worst_points"], r["worst_points"])
        b["sum_points"] = round(b["sum_points"] + r["worst_points"], 3)
    return sorted(agg.values(), key=lambda b: -b["sum_points"])


def sensitivity_report(forms: dict, data_info: dict | None, budget: float, why: str) -> dict:
    """``forms``: form name -> {"measured_with", "stages": [stage_sensitivity rows per stage]}."""
    out = {"what": "accuracy drop (points) at each exit with only one layer of one stage quantized (the other layers "
                   "and stages FP32), held-out data", "why": why, "data": data_info, "max_exit_drop_points": budget,
           "forms": {}}
    for name, f in forms.items():
        stages = [{"stage": k, "layers": rows, "blocks": _blocks(rows)} for k, rows in enumerate(f["stages"])]
        top = sorted((dict(r, stage=s["stage"]) for s in stages for r in s["layers"]), key=lambda r: -r["worst_points"])
        out["forms"][name] = {"measured_with": f["measured_with"], "stages": stages,
                              "most_sensitive": [{"stage": r["stage"], "layer": r["layer"], "worst_points": r["worst_points"]}
                                                 for r in top[:10]]}
    return out
