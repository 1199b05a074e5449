"""DMPO early-exit models (torch; imported lazily by the commands that need it).

Quick start::

    from dmpo_edge.models import build_model, save_checkpoint, load_checkpoint, TINY_VIT_CONFIG
    model = build_model(TINY_VIT_CONFIG)            # tiny ViT, 3 exits, 32 x 32 input, random weights
    model = build_model({"backbone": "efficientnet_lite0", "image_size": 64, "num_classes": 10})  # ImageNet trunk
    model, meta = load_checkpoint("model.pt")       # meta: config, classes, preprocess, loss_schedule, metrics
"""

from .base import EarlyExitModel
from .checkpoint import FORMAT, VERSION, build_model, load_checkpoint, save_checkpoint
from .config import BACKBONES, DEFAULTS, TINY_VIT_CONFIG, normalize_config
from .schedule import LossSchedule

__all__ = [
    "EarlyExitModel", "build_model", "save_checkpoint", "load_checkpoint", "FORMAT", "VERSION", "BACKBONES", "DEFAULTS",
    "TINY_VIT_CONFIG", "normalize_config", "LossSchedule",
]
