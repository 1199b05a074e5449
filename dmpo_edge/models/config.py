"""The architecture record of a DMPO model: defaults, validation and the normalised form stored in model.pt.

Every choice that shapes the model is a key here; ``build_model(config)`` rebuilds exactly the same modules.
Exits are block indices (0-based, "exit after block i"); the last block always carries the final exit.
"""

from __future__ import annotations

import copy
import math

from ..errors import DmpoEdgeError

__all__ = ["DEFAULTS", "BACKBONES", "normalize_config", "backbone_depth", "default_exits", "TINY_VIT_CONFIG"]

BACKBONES = ("efficientnet_lite0", "vit_tiny", "vit_small", "vit_base", "vit")

DEFAULTS = {
    "backbone": "efficientnet_lite0",
    "num_classes": 10,
    "image_size": 64,
    "exits": None,  # block indices; None -> the backbone's default
    # ViT shape (presets fill these in; 'vit' takes them as given)
    "patch_size": 16,
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "mlp_ratio": 4.0,
    # where the pre-trained backbone comes from at build time: True (bundled / none for ViT), False, or a path
    "pretrained": True,
    "freeze_backbone": True,
    # parameter-efficient tuning
    "adapter_dim": 32,  # 0 = no adapters
    "adapter_scale": 0.1,
    "lora_rank": 8,  # 0 = no LoRA
    "lora_alpha": 8.0,
    # DMPO exit heads
    "bypass": True,
    "bypass_dim": 32,
    "bypass_detach": False,
    "early_head": "cov",  # 'cov' (high-order statistics) | 'linear' | 'first_order' (sized like a DMPO exit)
    # 'first_order' heads: [width, hidden] per early exit, chosen once at build time (models/matched.py) and
    # stored so that a checkpoint rebuilds exactly the same shapes
    "head_widths": None,
    "cov_dim": 32,
    "ns_iters": 5,
    "head_dropout": 0.0,
}

#: a small ViT for tests and quick experiments (runs in milliseconds on a CPU)
TINY_VIT_CONFIG = {
    "backbone": "vit", "image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
    "num_classes": 10, "exits": [0, 1, 3], "pretrained": False, "adapter_dim": 8, "lora_rank": 2,
    "bypass_dim": 16, "cov_dim": 8,
}


#: upper bounds of the integer keys (others: 65536), far beyond any model this tool targets
_MAX = {"image_size": 4096, "patch_size": 4096, "ns_iters": 100, "embed_dim": 16384, "depth": 256, "num_heads": 1024,
        "num_classes": 1 << 20}


def _vit_shape(cfg: dict) -> None:
    from .vit import VIT_PRESETS

    name = cfg["backbone"]
    if name in VIT_PRESETS:
        dim, depth, heads = VIT_PRESETS[name]
        cfg["embed_dim"] = dim if cfg["embed_dim"] is None else cfg["embed_dim"]
        cfg["depth"] = depth if cfg["depth"] is None else cfg["depth"]
        cfg["num_heads"] = heads if cfg["num_heads"] is None else cfg["num_heads"]
    for key in ("embed_dim", "depth", "num_heads"):
        if cfg[key] is None:
            raise DmpoEdgeError("config", f"backbone 'vit' needs '{key}'. Expected an int, or use vit_tiny/vit_small/vit_base")
        try:
            cfg[key] = int(cfg[key])
        except (TypeError, ValueError, OverflowError):
            raise DmpoEdgeError("config", f"'{key}' must be an integer, got {cfg[key]!r}") from None
        if not 1 <= cfg[key] <= _MAX[key]:
            raise DmpoEdgeError("config", f"'{key}' = {cfg[key]} is out of range 1..{_MAX[key]}")
    if cfg["image_size"] % cfg["patch_size"]:
        raise DmpoEdgeError(
            "config", f"image size {cfg['image_size']} is not a multiple of patch size {cfg['patch_size']}. Expected a multiple"
        )


def backbone_depth(cfg: dict) -> int:
    if cfg["backbone"] == "efficientnet_lite0":
        return 16
    return int(cfg["depth"])


def default_exits(cfg: dict) -> list:
    if cfg["backbone"] == "efficientnet_lite0":
        # ends of the 24-, 80- and 112-channel groups + the end: about 28%, 49% and 72% of the static model's
        # FLOPs at 64 x 64 (adapters and heads included), so budgets from 30% up have an exit to use
        return [2, 7, 10, 15]
    d = backbone_depth(cfg)
    return sorted({max(0, d // 4 - 1), max(0, d // 2 - 1), max(0, 3 * d // 4 - 1), d - 1})


def normalize_config(config: dict) -> dict:
    """Fill defaults, validate, and return the full record (a new dict of JSON-like values)."""
    if not isinstance(config, dict):
        raise DmpoEdgeError("config", f"model config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise DmpoEdgeError("config", f"unknown config key(s) {unknown}. Expected some of {sorted(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(config))
    if cfg["backbone"] not in BACKBONES:
        raise DmpoEdgeError("config", f"unknown backbone '{cfg['backbone']}'. Expected one of {', '.join(BACKBONES)}")
    for key in ("num_classes", "image_size", "patch_size", "adapter_dim", "lora_rank", "bypass_dim", "cov_dim", "ns_iters"):
        try:
            cfg[key] = int(cfg[key])
        except (TypeError, ValueError, OverflowError):
            raise DmpoEdgeError("config", f"'{key}' must be an integer, got {cfg[key]!r}") from None
        if cfg[key] < (1 if key in ("num_classes", "image_size", "patch_size", "bypass_dim", "cov_dim") else 0):
            raise DmpoEdgeError("config", f"'{key}' = {cfg[key]} is out of range")
        if cfg[key] > _MAX.get(key, 1 << 16):  # configs arrive inside model files: bound what they can make us build
            raise DmpoEdgeError("config", f"'{key}' = {cfg[key]} is out of range (at most {_MAX.get(key, 1 << 16)})")
    if cfg["num_classes"] < 2:
        raise DmpoEdgeError("config", f"num_classes = {cfg['num_classes']}; a classifier needs at least 2 classes")
    if cfg["early_head"] not in ("cov", "linear", "first_order"):
        raise DmpoEdgeError("config", f"early_head '{cfg['early_head']}' is not 'cov', 'linear' or 'first_order'")
    if cfg["backbone"].startswith("vit"):
        _vit_shape(cfg)
    else:
        for key in ("embed_dim", "depth", "num_heads"):
            cfg[key] = None
        if cfg["image_size"] < 32:
            raise DmpoEdgeError("config", f"image size {cfg['image_size']} is too small for EfficientNet. Expected >= 32")
    depth = backbone_depth(cfg)
    exits = default_exits(cfg) if cfg["exits"] is None else cfg["exits"]
    try:
        exits = sorted({int(e) for e in exits})
    except (TypeError, ValueError, OverflowError):
        raise DmpoEdgeError("config", f"exits {cfg['exits']!r} must be block indices (integers)") from None
    bad = [e for e in exits if e < 0 or e >= depth]
    if bad:
        raise DmpoEdgeError(
            "config",
            f"exit(s) {bad} are beyond the depth of {cfg['backbone']} ({depth} blocks). "
            f"Expected block indices 0..{depth - 1}",
        )
    if not exits or exits[-1] != depth - 1:
        exits.append(depth - 1)  # the final exit sits on the last block
    cfg["exits"] = exits
    if cfg["head_widths"] is not None:
        hw = cfg["head_widths"]
        ok = isinstance(hw, (list, tuple)) and len(hw) == len(exits) - 1 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
            and 1 <= p[0] <= 1 << 16 and 0 <= p[1] <= 1 << 16 for p in hw)
        if not ok:
            raise DmpoEdgeError("config", f"head_widths {hw!r} must be one [width, hidden] pair of integers per early exit "
                                f"({len(exits) - 1})")
        cfg["head_widths"] = [[int(a), int(b)] for a, b in hw]
    for key in ("adapter_scale", "lora_alpha", "mlp_ratio", "head_dropout"):
        try:
            cfg[key] = float(cfg[key])
        except (TypeError, ValueError, OverflowError):
            raise DmpoEdgeError("config", f"'{key}' must be a number, got {cfg[key]!r}") from None
        if not math.isfinite(cfg[key]) or not 0 <= cfg[key] <= (1.0 if key == "head_dropout" else 1e4):
            raise DmpoEdgeError("config", f"'{key}' = {cfg[key]} is out of range")
    for key in ("bypass", "bypass_detach", "freeze_backbone"):
        cfg[key] = bool(cfg[key])
    if not isinstance(cfg["pretrained"], (bool, str)):
        raise DmpoEdgeError("config", "'pretrained' must be true, false or a weights path")
    return cfg
