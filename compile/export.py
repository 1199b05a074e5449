"""ONNX export of one stage module with a dynamic batch, simplification and the ONNX checker.

The exporter is ``torch.onnx.export`` (the dynamo exporter, falling back to the TorchScript one when a model
does not trace under ``torch.export``); the simplifier is onnxsim, falling back to onnxslim where onnxsim is
missing or fails. Which ones ran is returned so that the manifest can record it.
"""

from __future__ import annotations

import os
import warnings

from .._lazy import available, require
from ..errors import DmpoEdgeError
from ._quiet import quiet_tools
from .graph import load_model, save_model

__all__ = ["export_stage", "simplify", "check_model", "DEFAULT_OPSET", "MIN_OPSET", "EXPORTERS"]

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization is opset 17; Q/DQ with per-channel scales needs >= 13
EXPORTERS = ("auto", "dynamo", "torchscript")


def _export_dynamo(torch, module, args, path, io_, opset):
    from torch.export import Dim

    dims = {"batch": Dim("batch", min=1, max=1 << 16)}
    if io_.k == 0:
        shapes = {"x": {0: dims["batch"]}}
    else:
        shapes = {"features": {0: Dim("batch_in", min=1, max=1 << 16)}, "keep_idx": {0: dims["batch"]}}
    # forward(*args) has no named parameters, so dynamic shapes are given positionally
    dyn = tuple(shapes.values())
    prog = torch.onnx.export(
        module, args, None, dynamo=True, input_names=io_.inputs, output_names=io_.outputs, opset_version=opset,
        dynamic_shapes=(dyn,), optimize=True, verbose=False,
    )
    prog.save(path, external_data=False)


def _export_torchscript(torch, module, args, path, io_, opset):
    torch.onnx.export(
        module, args, path, dynamo=False, input_names=io_.inputs, output_names=io_.outputs, opset_version=opset,
        dynamic_axes=io_.dynamic_axes(), do_constant_folding=True,
    )


def _rename_batch_dims(model, io_) -> None:
    """Name the batch axis of every input/output after the contract ('batch', 'batch_in' for features_in)."""
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if not len(dims):
            continue
        want = "batch_in" if v.name == "features_in" else "batch"
        d0 = dims[0]
        d0.Clear()
        d0.dim_param = want


def export_stage(module, example_args: tuple, path: str, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> str:
    """Export stage ``module`` called on ``example_args`` to ``path``; returns the exporter that succeeded."""
    torch = require("torch", "exporting stages to ONNX")
    require("onnx", "exporting stages to ONNX")
    if exporter not in EXPORTERS:
        raise DmpoEdgeError("export", f"unknown exporter '{exporter}'. Expected one of {', '.join(EXPORTERS)}")
    if opset < MIN_OPSET:
        raise DmpoEdgeError("export", f"opset {opset} is too old. Expected >= {MIN_OPSET} (LayerNormalization, Q/DQ)")
    io_ = module.io
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    if "dynamo" in order and not available("onnxscript"):
        order.remove("dynamo")
    errors = []
    for name in order:
        fn = _export_dynamo if name == "dynamo" else _export_torchscript
        try:
            with torch.no_grad(), quiet_tools():
                fn(torch, module, example_args, path, io_, opset)
            model = load_model(path)
            _rename_batch_dims(model, io_)
            got_in = [v.name for v in model.graph.input if v.name not in {i.name for i in model.graph.initializer}]
            got_out = [v.name for v in model.graph.output]
            if got_in != io_.inputs or got_out != io_.outputs:
                raise RuntimeError(f"exported I/O {got_in} -> {got_out}, expected {io_.inputs} -> {io_.outputs}")
            save_model(model, path)
            return name
        except DmpoEdgeError:
            raise
        except Exception as exc:  # exporters raise many types; try the next one, report all if none works
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise DmpoEdgeError(
        f"export stage {io_.k}",
        "ONNX export failed (" + "; ".join(errors) + "). Expected a model whose forward_stage/forward_exit trace "
        "with torch.export or torch.jit (no data-dependent Python control flow)",
    )


def simplify(path: str, prefer: str = "onnxsim") -> str:
    """Simplify the graph at ``path`` in place; returns 'onnxsim', 'onnxslim' or 'none' (what actually ran)."""
    onnx = require("onnx", "simplifying stage graphs")
    model = load_model(path)
    tried = []
    order = [prefer] + [t for t in ("onnxsim", "onnxslim") if t != prefer]
    for tool in order:
        if not available(tool):
            tried.append(f"{tool} not installed")
            continue
        try:
            with quiet_tools():
                if tool == "onnxsim":
                    import onnxsim

                    out, ok = onnxsim.simplify(model)
                    if not ok:
                        raise RuntimeError("onnxsim check failed")
                else:
                    import onnxslim

                    out = onnxslim.slim(model)
            onnx.checker.check_model(out)
            # simplifiers may drop the symbolic batch names; keep the contract's names
            orig = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
            for v in list(out.graph.input) + list(out.graph.output):
                if v.name in orig and len(v.type.tensor_type.shape.dim):
                    want = orig[v.name].type.tensor_type.shape.dim[0]
                    d0 = v.type.tensor_type.shape.dim[0]
                    d0.CopyFrom(want)
            save_model(out, path)
            return tool
        except Exception as exc:  # any simplifier failure: fall back, the unsimplified graph stays valid
            tried.append(f"{tool}: {type(exc).__name__}")
    warnings.warn(f"simplify | no simplifier ran on {os.path.basename(path)} ({'; '.join(tried)}); the graph is kept as exported", stacklevel=2)
    return "none"


def check_model(path_or_model, where: str = "onnx") -> None:
    """onnx.checker with full shape inference; a failure is a DmpoEdgeError naming the stage."""
    onnx = require("onnx", "checking stage graphs")
    try:
        if isinstance(path_or_model, str):
            onnx.checker.check_model(path_or_model, full_check=True)
        else:
            onnx.checker.check_model(path_or_model, full_check=True)
    except Exception as exc:
        raise DmpoEdgeError(where, f"the ONNX checker rejects the graph ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
