"""torch-tensorrt frontend: each stage module -> ``torch.export`` with a dynamic batch -> serialized TensorRT engine.

``dmpo-edge build BUNDLE --frontend torch-tensorrt --checkpoint model.pt`` (or ``compile --frontend
torch-tensorrt`` on a GPU machine) writes the engines into the same ``engines/<device key>/`` layout as the ONNX
frontend. torch_tensorrt is imported lazily.

Keyword arguments of ``torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine`` differ by
release (read from pytorch/TensorRT's ``py/torch_tensorrt/dynamo/_compiler.py``; the lists per version are kept in
``tests/test_trt_api_conformance.py``), and the function swallows unknown ones in ``**kwargs``, so every keyword
is passed only where the installed signature names it:

- FP16: ``enabled_precisions={torch.float16}`` (with ``use_explicit_typing=False`` where that exists) in
  2.5 - 2.12. From 2.13 ``enabled_precisions`` is gone and engines are strongly typed (precision follows the
  model's dtypes), so an FP16 build is refused there rather than silently producing FP32 engines: the ONNX
  frontend builds FP16 engines from the bundle's FP16 graphs. INT8 engines always come from the ONNX frontend.
- Tensor names: releases with ``arg_input_binding_names`` / ``output_binding_names`` name the engine's tensors
  after the stage contract at export; older ones name outputs ``output0``, ``output1``, ... and the mapping to
  the contract is written as ``io_map`` in ``engines.json``, which the TensorRT backend reads.
"""

from __future__ import annotations

import inspect
import os
import time

from .._lazy import require
from ..bundle import sha256_file
from ..errors import DmpoEdgeError
from .stages import FEATURES_IN, INPUT, KEEP_IDX, make_stage_module

__all__ = ["build_torch_tensorrt_engines", "export_stage_program", "named_stage", "build_kwargs"]


def named_stage(model, k: int, policy: str):
    """The stage module behind a forward whose parameter names are the contract's input names."""
    torch = require("torch", "torch-tensorrt frontend")
    inner = make_stage_module(model, k, policy)

    if k == 0:
        class Stage0(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input):  # noqa: A002 - the contract's input name
                return self.inner(input)

        return Stage0().eval()

    class StageK(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, features_in, keep_idx):
            return self.inner(features_in, keep_idx)

    return StageK().eval()


def export_stage_program(module, k: int, example: tuple, max_batch: int):
    """``torch.export`` of a stage with the batch axis dynamic (batch_in for the features of stage k > 0)."""
    torch = require("torch", "torch-tensorrt frontend")
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max(2, max_batch))
    if k == 0:
        shapes = {INPUT: {0: batch}}
    else:
        shapes = {FEATURES_IN: {0: Dim("batch_in", min=1, max=max(2, max_batch))}, KEEP_IDX: {0: batch}}
    return torch.export.export(module, example, dynamic_shapes=shapes)


def build_torch_tensorrt_engines(bundle, settings: dict, out_dir: str, checkpoint: str | None, log) -> list:
    torch = require("torch", "torch-tensorrt frontend")
    torch_tensorrt = require("torch_tensorrt", "the torch-tensorrt frontend")
    if settings["precision"] == "int8":
        raise DmpoEdgeError(
            "build", "the torch-tensorrt frontend builds fp32/fp16 engines; INT8 engines are built from the bundle's "
            "Q/DQ graphs with the default ONNX frontend (drop --frontend torch-tensorrt)",
        )
    if not checkpoint:
        raise DmpoEdgeError("build", "the torch-tensorrt frontend compiles the torch model: pass --checkpoint model.pt")
    want = (bundle.manifest.get("model") or {}).get("source", {}).get("sha256")
    if want and sha256_file(checkpoint) != want:
        raise DmpoEdgeError("build", f"'{checkpoint}' is not the checkpoint this bundle was compiled from (sha256 differs)")
    from ..models import load_checkpoint

    model, _meta = load_checkpoint(checkpoint)
    model = model.eval().cuda()
    policy = bundle.manifest["exit_policy"]
    fp16 = settings["precision"] == "fp16"
    sig = inspect.signature(torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine).parameters
    version = getattr(torch_tensorrt, "__version__", "?")
    if fp16 and "enabled_precisions" not in sig:
        raise DmpoEdgeError(
            "build", f"torch-tensorrt {version} has no enabled_precisions (removed in 2.13: engines follow the model's "
            "dtypes), so it would build FP32 engines for this fp16 bundle. Build with the ONNX frontend (drop "
            "--frontend torch-tensorrt) or install torch-tensorrt 2.5 - 2.12",
        )
    engines = []
    feats = None
    h, w = bundle.preprocess.size
    x = torch.zeros(2, 3, h, w, device="cuda")
    for k in range(bundle.num_stages):
        t0 = time.perf_counter()
        mod = named_stage(model, k, policy).cuda()
        example = (x,) if k == 0 else (feats, torch.arange(feats.shape[0], dtype=torch.int32, device="cuda"))
        with torch.no_grad():
            outs = mod(*example)
        prog = export_stage_program(mod, k, example, settings["max_batch"])
        prof = settings["profiles"][k][0]
        inputs = []
        for name in ([INPUT] if k == 0 else [FEATURES_IN, KEEP_IDX]):
            mn, opt, mx = prof[name]
            dtype = torch.int32 if name == KEEP_IDX else torch.float32
            inputs.append(torch_tensorrt.Input(min_shape=list(mn), opt_shape=list(opt), max_shape=list(mx), dtype=dtype))
        contract_in = list(mod.inner.io.inputs)
        contract_out = list(mod.inner.io.outputs)
        kwargs = build_kwargs(sig, inputs, settings["workspace_bytes"], torch.float16 if fp16 else None,
                              contract_in, contract_out)
        blob = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(prog, **kwargs)
        name = f"stage_{k}.engine"
        path = os.path.join(out_dir, name)
        with open(path, "wb") as f:
            f.write(bytes(blob))
        io_names = _engine_io_names(bytes(blob))
        io_map = {}
        if io_names:  # engine tensor name -> contract name (identity where the release named them at export)
            io_map.update(dict(zip(io_names["inputs"], contract_in)))
            io_map.update(dict(zip(io_names["outputs"], contract_out)))
        engines.append({"stage": k, "file": name, "sha256": sha256_file(path), "onnx_sha256": bundle.stages[k]["sha256"],
                        "frontend": "torch-tensorrt", "io_map": io_map, "build_s": round(time.perf_counter() - t0, 2)})
        if k < bundle.num_stages - 1:
            feats = outs[0]
        log(f"build: stage {k} engine (torch-tensorrt) in {engines[-1]['build_s']} s")
    return engines


def build_kwargs(sig, inputs: list, workspace_bytes: int, fp16_dtype, contract_in: list, contract_out: list) -> dict:
    """The keywords for this torch-tensorrt release's ``convert_exported_program_to_serialized_trt_engine``
    (``sig``: its parameters): only names the release has, since unknown ones vanish into ``**kwargs``."""
    kwargs = {"arg_inputs" if "arg_inputs" in sig else "inputs": inputs, "workspace_size": int(workspace_bytes)}
    if fp16_dtype is not None:
        if "enabled_precisions" not in sig:
            raise DmpoEdgeError("build", "this torch-tensorrt has no enabled_precisions: it cannot build FP16 engines "
                                "from an FP32 model. Use the ONNX frontend")
        kwargs["enabled_precisions"] = {fp16_dtype}
        if "use_explicit_typing" in sig:
            kwargs["use_explicit_typing"] = False  # explicit typing would ignore enabled_precisions
    if "arg_input_binding_names" in sig and "output_binding_names" in sig:
        kwargs["arg_input_binding_names"] = list(contract_in)
        kwargs["output_binding_names"] = list(contract_out)
    return kwargs


def _engine_io_names(blob: bytes) -> dict | None:
    """Engine tensor names by mode (torch-tensorrt may name outputs output0, output1, ...)."""
    trt = require("tensorrt", "reading engine tensor names")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        return None
    ins, outs = [], []
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        (ins if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else outs).append(n)
    return {"inputs": ins, "outputs": outs}
