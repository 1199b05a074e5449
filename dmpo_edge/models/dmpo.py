"""The DMPO early-exit model: a frozen pre-trained backbone cut into stages, PEFT modules, and one exit per stage.

Early exit k = bypass (its own transformed copy of the shallow features) -> predictor (high-order statistics by
default); the trunk passes the untouched features on to the next stage. The final exit is the backbone's own
linear head on its final features.
"""

from __future__ import annotations

from .._lazy import require
from ..errors import DmpoEdgeError
from .base import EarlyExitModel
from .config import normalize_config
from .heads import Bypass, CovariancePredictor, FirstOrderPredictor, LinearPredictor

torch = require("torch", "models")
nn = torch.nn

__all__ = ["DMPOModel", "make_backbone"]


def make_backbone(cfg: dict):
    if cfg["backbone"] == "efficientnet_lite0":
        from .efficientnet import EfficientNetLiteBackbone

        return EfficientNetLiteBackbone("efficientnet_lite0", cfg["image_size"], cfg["num_classes"])
    from .vit import VisionTransformer

    return VisionTransformer(
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], num_classes=cfg["num_classes"],
    )


def load_pretrained(backbone, cfg: dict) -> dict | None:
    """Load the pre-trained trunk named by ``cfg['pretrained']`` (before PEFT modules are injected)."""
    src = cfg["pretrained"]
    if src is False:
        return None
    if cfg["backbone"] == "efficientnet_lite0":
        from .efficientnet import pretrained_efficientnet_lite0_path
        from .weights import load_checked, read_state_dict

        sd = read_state_dict(pretrained_efficientnet_lite0_path() if src is True else src)
        own = backbone.state_dict()
        head = [k for k in ("_fc.weight", "_fc.bias") if k in sd and sd[k].shape != own[k].shape]
        for k in head:
            sd.pop(k)  # a new task: the ImageNet classifier does not fit
        return load_checked(backbone, sd, "efficientnet weights", allow_missing=lambda n: n.startswith("_fc."))
    if src is True:
        return None  # no ViT weights ship offline; pass a timm-format file as 'pretrained'
    from .vit import load_vit_weights

    return load_vit_weights(backbone, src)


class EarlyExit(nn.Module):
    def __init__(self, kind: str, channels: int, cfg: dict, widths=None):
        super().__init__()
        nc = cfg["num_classes"]
        self.bypass = Bypass(kind, channels, cfg["bypass_dim"], cfg["bypass_detach"]) if cfg["bypass"] else nn.Identity()
        if cfg["early_head"] == "cov":
            self.predictor = CovariancePredictor(kind, channels, nc, cfg["cov_dim"], cfg["ns_iters"], cfg["head_dropout"])
        elif cfg["early_head"] == "first_order":
            self.predictor = FirstOrderPredictor(kind, channels, nc, widths[0], widths[1], cfg["head_dropout"])
        else:
            self.predictor = LinearPredictor(kind, channels, nc, cfg["head_dropout"])

    def forward(self, feats):
        return self.predictor(self.bypass(feats))


class DMPOModel(EarlyExitModel):
    def __init__(self, config: dict, load_weights: bool = True):
        super().__init__()
        cfg = normalize_config(config)
        self.config = cfg
        self.backbone = make_backbone(cfg)
        self.pretrained_report = load_pretrained(self.backbone, cfg) if load_weights else None
        if cfg["adapter_dim"] > 0:
            self.backbone.add_adapters(cfg["adapter_dim"], cfg["adapter_scale"])
        if cfg["lora_rank"] > 0:
            self.backbone.add_lora(cfg["lora_rank"], cfg["lora_alpha"])
        kind = self.backbone.feature_kind
        self._bounds = [(0 if k == 0 else cfg["exits"][k - 1] + 1, b + 1) for k, b in enumerate(cfg["exits"])]
        widths = [None] * (len(cfg["exits"]) - 1)
        if cfg["early_head"] == "first_order":
            if cfg["head_widths"] is None:
                from .matched import match_first_order

                cfg["head_widths"] = [list(m["widths"]) for m in match_first_order(self)]
            widths = cfg["head_widths"]
        self.exits = nn.ModuleList(EarlyExit(kind, self.backbone.channels(b), cfg, w) for b, w in zip(cfg["exits"][:-1], widths))
        if cfg["freeze_backbone"]:
            self.freeze_backbone()

    # -- the early-exit contract ------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.config["exits"])

    def _check_stage(self, k: int) -> int:
        if not 0 <= int(k) < self.num_stages:
            raise DmpoEdgeError("model", f"stage {k} does not exist. Expected 0..{self.num_stages - 1}")
        return int(k)

    def forward_stage(self, k: int, x):
        k = self._check_stage(k)
        if k == 0:
            x = self.backbone.stem(x)
        lo, hi = self._bounds[k]
        for i in range(lo, hi):
            x = self.backbone.block(i, x)
        return x

    def forward_exit(self, k: int, feats):
        k = self._check_stage(k)
        if k == self.num_stages - 1:
            return self.backbone.forward_head(feats)
        return self.exits[k](feats)

    def merged(self):
        """A copy for deployment: LoRA layers folded into plain layers (identical outputs, fewer graph nodes)."""
        from .peft import fold_lora

        return fold_lora(self).eval()

    # -- tuning -----------------------------------------------------------------------------------------------
    def trainable_names(self) -> set:
        """Adapters, LoRA, exit heads and the final linear head: what tuning updates."""
        names = {n for n, _ in self.named_parameters() if not n.startswith("backbone.")}
        names |= {n for n, _ in self.named_parameters() if ".lora_" in n or ".adapter." in n}
        for m in self.backbone.head_modules():
            names |= {n for n, p in self.named_parameters() if any(p is q for q in m.parameters())}
        return names

    def freeze_backbone(self) -> None:
        keep = self.trainable_names()
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.config["freeze_backbone"]:
            # a frozen CNN keeps its pre-trained BatchNorm statistics: small tuning batches must not move them
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
