"""Compile: stage split, ONNX export, simplify, precision (FP16/INT8), bundle writer, TensorRT builders.

Public API (torch, onnx and the quantizers are imported only when these run)::

    from dmpo_edge.compile import compile_bundle, build_engines
    bundle = compile_bundle("model.pt", "bundle", precision="int8", calib="digits:train")
    build_engines("bundle")          # on the target: TensorRT + GPU

Importing this package needs numpy only.
"""

from __future__ import annotations

__all__ = ["compile_bundle", "compile_model", "build_engines", "build_settings", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "int8")


def __getattr__(name):
    # lazy attributes: keep `import dmpo_edge.compile` free of torch/onnx
    if name in ("compile_bundle", "compile_model"):
        from . import compiler

        return getattr(compiler, name)
    if name == "build_engines":
        from .trt_builder import build_engines

        return build_engines
    if name == "build_settings":
        from .trt_settings import build_settings

        return build_settings
    raise AttributeError(f"module 'dmpo_edge.compile' has no attribute {name!r}")
