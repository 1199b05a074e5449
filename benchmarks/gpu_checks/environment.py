"""What the machine has: GPU, packages, CUDA toolkit; who sees a CUDA device (torch, the device layer)."""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from dmpo_edge._lazy import available, installed_version, require

from . import checkout
from .kit import find_cuda_toolkit, kit_size
from .report import one_line

__all__ = ["environment", "probe_cuda"]


def environment(args, cuda: dict) -> dict:
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "dmpo_edge_import": checkout.IMPORT_MODE, "numpy": np.__version__,
        "packages": {d: installed_version(d) for d in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "pycuda",
                                               "cuda-python", "cuda-bindings", "cupy-cuda12x", "cupy-cuda13x",
                                               "nvidia-modelopt", "scikit-learn")},
        "cuda": cuda, "toolkit": find_cuda_toolkit(),
    }
    kit = getattr(args, "kit", None)
    if kit and os.path.isdir(kit):
        env["kit"] = {"path": kit, "bytes": kit_size(kit)}
    if available("tensorrt"):
        env["tensorrt"] = require("tensorrt").__version__
    if available("onnxruntime"):
        env["ort_providers"] = require("onnxruntime").get_available_providers()
    return env


def probe_cuda() -> dict:
    """Who sees a GPU: torch, the runtime's device layer (pycuda / cuda-python). Never raises."""
    out = {"torch_cuda": False, "device_layer": False, "gpu": None, "sm": None}
    try:
        import torch

        if torch.cuda.is_available():
            out["torch_cuda"] = True
            out["gpu"] = torch.cuda.get_device_name(0)
            out["sm"] = "".join(str(v) for v in torch.cuda.get_device_capability(0))
            out["torch_cuda_version"] = torch.version.cuda
    except Exception as exc:
        out["torch_error"] = one_line(exc)
    try:
        from dmpo_edge.runtime.device import cuda_device_present

        out["device_layer"] = bool(cuda_device_present())
    except Exception as exc:
        out["device_layer_error"] = one_line(exc)
    out["present"] = bool(out["torch_cuda"] or out["device_layer"])
    return out
