"""Small ONNX graph helpers: I/O descriptions for the manifest, traversal, the exit-head region, dtype surgery.

Everything works on ``onnx.ModelProto`` in memory; onnx is imported inside the functions.
"""

from __future__ import annotations

import os

from .._lazy import require
from ..errors import DmpoEdgeError

__all__ = [
    "load_model", "save_model", "io_specs", "elem_dtype", "producers", "consumers", "ancestors", "descendants",
    "ensure_node_names", "constant_tensors", "exit_head_nodes", "is_second_order_head", "op_counts",
    "set_float16_io", "drop_output", "opset_of", "terminal_outputs", "force_output_types",
]

_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 3: "int8", 2: "uint8", 9: "bool", 11: "float64"}


def load_model(path: str):
    onnx = require("onnx", "reading stage graphs")
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf raises DecodeError and friends for a damaged file
        raise DmpoEdgeError(f"onnx {path}", f"cannot read the graph ({type(exc).__name__}: {exc})") from None


def save_model(model, path: str) -> str:
    """Save with the weights inside the file (stage graphs are small; one file per stage keeps bundles simple)."""
    onnx = require("onnx", "writing stage graphs")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=False)
    return path


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def elem_dtype(elem_type: int) -> str:
    if elem_type not in _DTYPES:
        raise DmpoEdgeError("onnx", f"tensor element type {elem_type} is not one a stage may carry")
    return _DTYPES[elem_type]


def _spec(vi) -> dict:
    t = vi.type.tensor_type
    shape = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        else:
            shape.append(d.dim_param or "?")
    return {"name": vi.name, "shape": shape, "dtype": elem_dtype(t.elem_type)}


def io_specs(model) -> tuple:
    """(inputs, outputs) as manifest tensor entries ``{"name", "shape", "dtype"}`` (initializers are not inputs)."""
    inits = {i.name for i in model.graph.initializer}
    ins = [_spec(v) for v in model.graph.input if v.name not in inits]
    outs = [_spec(v) for v in model.graph.output]
    return ins, outs


def op_counts(model) -> dict:
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def ensure_node_names(model):
    """Give every node a unique name (the precision tools select nodes by name)."""
    seen = set()
    for i, n in enumerate(model.graph.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        n.name = name
        seen.add(name)
    return model


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output if o}


def consumers(model) -> dict:
    out = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def constant_tensors(model) -> set:
    """Names of tensors fixed at build time: initializers, Constant outputs, and what Cast / Identity /
    Q / DQ / Transpose make of them (fp16 or quantized copies of weights)."""
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.op_type not in ("Cast", "Identity", "DequantizeLinear", "QuantizeLinear", "Transpose"):
                continue
            if any(o not in names for o in n.output) and all((not i) or i in names for i in n.input):
                names |= set(n.output)
                changed = True
    return names


def ancestors(model, tensors) -> set:
    """Names of the nodes whose outputs (transitively) feed any of ``tensors``."""
    prod = producers(model)
    seen, stack = set(), list(tensors)
    done = set()
    while stack:
        t = stack.pop()
        if t in done:
            continue
        done.add(t)
        n = prod.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(i for i in n.input if i)
    return seen


def descendants(model, tensors) -> set:
    """Names of the nodes that (transitively) consume any of ``tensors``."""
    cons = consumers(model)
    seen, stack, done = set(), list(tensors), set()
    while stack:
        t = stack.pop()
        if t in done:
            continue
        done.add(t)
        for n in cons.get(t, []):
            if n.name not in seen:
                seen.add(n.name)
                stack.extend(o for o in n.output if o)
    return seen


def exit_head_nodes(model, trunk_output: str, logits: str = "logits") -> set:
    """The exit head and score: nodes needed for ``logits``/scores that the trunk output does not need.

    ``trunk_output`` is the stage's features output (or the last stage's probe output); shape helpers that
    also feed the trunk are excluded, so this is exactly what runs only for the exit.
    """
    outs = [o.name for o in model.graph.output if o.name != trunk_output]
    names = {o.name for o in model.graph.output}
    if trunk_output not in names or logits not in names:
        raise DmpoEdgeError("stage graph", f"outputs {sorted(names)} lack '{trunk_output}' or '{logits}'")
    return ancestors(model, outs) - ancestors(model, [trunk_output])


def is_second_order_head(model, head: set) -> bool:
    """True when the head multiplies two activations (covariance pooling, Newton-Schulz): the numerically
    sensitive kind (squares of activations, iterated matrix products) that stays in FP32."""
    const = constant_tensors(model)
    for n in model.graph.node:
        if n.name in head and n.op_type in ("MatMul", "Einsum", "Gemm"):
            ins = [i for i in n.input[:2] if i]
            if len(ins) == 2 and not any(i in const for i in ins):
                return True
    return False


def terminal_outputs(model):
    """Give every graph output that other nodes also read its own Identity, so no node consumes a graph output.

    Some converters (onnxconverter-common's float16 with keep_io_types) retype a graph output and forget the
    nodes that read it; with a terminal Identity the inside tensor and the output are two names.
    """
    onnx = require("onnx", "stage graph surgery")
    cons = consumers(model)
    prod = producers(model)
    for out in model.graph.output:
        name = out.name
        if not cons.get(name) or name not in prod:
            continue
        inner = name + "__inner"
        p = prod[name]
        for j, o in enumerate(p.output):
            if o == name:
                p.output[j] = inner
        _rename_input_uses(model, name, inner)
        idx = list(model.graph.node).index(p)
        model.graph.node.insert(idx + 1, onnx.helper.make_node("Identity", [inner], [name], name=name + "__out"))
    return model


def force_output_types(model, want: dict):
    """Make graph outputs ``{name: onnx elem type}`` carry exactly that type (a converter may leave e.g. the
    confidence as float16 behind a Cast): retarget a producing Cast, else append one."""
    onnx = require("onnx", "stage graph surgery")
    prod = producers(model)
    for out in model.graph.output:
        t = want.get(out.name)
        if t is None or out.type.tensor_type.elem_type == t:
            continue
        p = prod.get(out.name)
        if p is not None and p.op_type == "Cast":
            for a in p.attribute:
                if a.name == "to":
                    a.i = t
        else:
            inner = out.name + "__typed"
            if p is not None:
                for j, o in enumerate(p.output):
                    if o == out.name:
                        p.output[j] = inner
            _rename_input_uses(model, out.name, inner)
            model.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=t, name=out.name + "__cast"))
        out.type.tensor_type.elem_type = t
    _drop_value_info(model, set(want))
    return model


def drop_output(model, name: str):
    """Remove graph output ``name`` (the nodes stay: the probe output is the trunk, which the head also reads)."""
    keep = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


def _rename_input_uses(model, old: str, new: str, skip=None) -> None:
    for n in model.graph.node:
        if n is skip:
            continue
        for j, i in enumerate(n.input):
            if i == old:
                n.input[j] = new


def set_float16_io(model, inputs=(), outputs=()):
    """Make the named graph inputs/outputs float16 while the graph inside keeps its types.

    Used for ``features`` / ``features_in`` of FP16 bundles: half the bytes between stages. A Cast(to fp32)
    that only fed an fp16 output is removed rather than doubled; elsewhere an explicit Cast is inserted.
    """
    onnx = require("onnx", "fp16 stage graphs")
    helper, TP = onnx.helper, onnx.TensorProto
    gin = {v.name: v for v in model.graph.input}
    gout = {v.name: v for v in model.graph.output}
    new_nodes = []
    for name in inputs:
        v = gin[name]
        if v.type.tensor_type.elem_type == TP.FLOAT16:
            continue
        v.type.tensor_type.elem_type = TP.FLOAT16
        # Gathering the survivors is dtype-agnostic: gather in fp16, then widen, so the cast touches only survivors.
        cons = consumers(model).get(name, [])
        gathers = [n for n in cons if n.op_type == "Gather" and n.input[0] == name]
        for g in gathers:
            out32 = g.output[0]
            g.output[0] = out32 + "__f16"
            new_nodes.append((g, helper.make_node("Cast", [g.output[0]], [out32], to=TP.FLOAT, name=out32 + "__widen")))
        others = [n for n in cons if n not in gathers]
        if others:
            wide = name + "__f32"
            for n in others:
                for j, i in enumerate(n.input):
                    if i == name:
                        n.input[j] = wide
            new_nodes.append((None, helper.make_node("Cast", [name], [wide], to=TP.FLOAT, name=wide + "__widen")))
    for name in outputs:
        v = gout[name]
        if v.type.tensor_type.elem_type == TP.FLOAT16:
            continue
        v.type.tensor_type.elem_type = TP.FLOAT16
        prod = producers(model).get(name)
        src_is_f16_cast = (
            prod is not None and prod.op_type == "Cast"
            and any(a.name == "to" and a.i == TP.FLOAT for a in prod.attribute)
            and _tensor_elem_type(model, prod.input[0]) == TP.FLOAT16
        )
        if src_is_f16_cast and len(consumers(model).get(name, [])) == 0:
            # ... -> x(fp16) -> Cast(fp32) -> output: drop the Cast and let x be the output
            src = prod.input[0]
            model.graph.node.remove(prod)
            for n in model.graph.node:
                for j, o in enumerate(n.output):
                    if o == src:
                        n.output[j] = name
            _rename_input_uses(model, src, name)
        else:
            wide = name + "__f32"
            if prod is not None:
                for j, o in enumerate(prod.output):
                    if o == name:
                        prod.output[j] = wide
            _rename_input_uses(model, name, wide)
            new_nodes.append((None, helper.make_node("Cast", [wide], [name], to=TP.FLOAT16, name=name + "__narrow")))
    # insert each new node right after its anchor (or at the front) to keep the node list topologically sorted
    for anchor, node in new_nodes:
        if anchor is None:
            if node.input[0] in gin:
                model.graph.node.insert(0, node)
            else:
                model.graph.node.append(node)
        else:
            idx = list(model.graph.node).index(anchor)
            model.graph.node.insert(idx + 1, node)
    _drop_value_info(model, {n.output[0] for _, n in new_nodes} | set(inputs) | set(outputs))
    return model


def _tensor_elem_type(model, name: str):
    onnx = require("onnx", "fp16 stage graphs")
    for coll in (model.graph.value_info, model.graph.input, model.graph.output):
        for v in coll:
            if v.name == name:
                return v.type.tensor_type.elem_type
    for i in model.graph.initializer:
        if i.name == name:
            return i.data_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    for v in inferred.graph.value_info:
        if v.name == name:
            return v.type.tensor_type.elem_type
    return None


def _drop_value_info(model, names: set) -> None:
    keep = [v for v in model.graph.value_info if v.name not in names and not v.name.endswith(("__f16", "__f32"))]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
