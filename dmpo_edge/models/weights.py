"""Reading weight files and loading them with clear errors (shape mismatches name the tensor and both shapes)."""

from __future__ import annotations

import os

from .._lazy import require
from ..errors import DmpoEdgeError

torch = require("torch", "models")

__all__ = ["read_state_dict", "load_checked"]


def read_state_dict(path: str) -> dict:
    """A .pth / .pt / .bin (torch, read with ``weights_only=True``) or .safetensors file -> {name: tensor}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DmpoEdgeError("weights", f"weights file '{path}' does not exist. Expected a .pth/.bin/.safetensors state dict")
    if path.endswith(".safetensors"):
        st = require("safetensors.torch", "reading .safetensors weights")
        try:
            return dict(st.load_file(path, device="cpu"))
        except Exception as exc:
            raise DmpoEdgeError("weights", f"cannot read '{path}' as safetensors ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DmpoEdgeError(
            "weights", f"cannot read '{path}' as a state dict ({type(exc).__name__}). Expected tensors saved with torch.save"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise DmpoEdgeError("weights", f"'{path}' is not a state dict (name -> tensor)")
    return dict(obj)


def load_checked(module, sd: dict, where: str, allow_missing=None, allow_unexpected: bool = False, check_only: bool = False) -> dict:
    """``module.load_state_dict`` with one clear error for each kind of mismatch.

    ``allow_missing(name) -> bool`` says which model tensors may stay as initialised (new tuning parameters).
    ``check_only`` validates names and shapes without copying (e.g. against a model built on the meta device).
    """
    own = module.state_dict()
    for name, value in sd.items():
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise DmpoEdgeError(
                where,
                f"tensor '{name}' has shape {tuple(value.shape)} in the weights but {tuple(own[name].shape)} in the model. "
                "Expected weights of the same architecture (check backbone, image/patch size, classes)",
            )
    unexpected = sorted(k for k in sd if k not in own)
    if unexpected and not allow_unexpected:
        raise DmpoEdgeError(
            where, f"{len(unexpected)} tensor(s) in the weights have no place in the model, first: '{unexpected[0]}'. "
            "Expected weights of the same architecture"
        )
    missing = sorted(k for k in own if k not in sd)
    hard_missing = [k for k in missing if not (allow_missing and allow_missing(k))]
    if hard_missing:
        raise DmpoEdgeError(
            where, f"{len(hard_missing)} model tensor(s) are missing from the weights, first: '{hard_missing[0]}'. "
            "Expected weights of the same architecture"
        )
    if not check_only:
        module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"loaded": sorted(k for k in sd if k in own), "skipped": unexpected, "missing": missing}
