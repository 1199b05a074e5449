"""A Vision Transformer in plain torch whose parameter names follow timm's ``VisionTransformer``.

``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 /
mlp.fc2``, ``norm``, ``head``: a timm (or Hugging Face hub timm) state dict loads with :func:`load_vit_weights`,
which also resizes the position embedding when the image or patch grid differs and converts the Hugging Face
``transformers`` ViT layout. Attention is written out (matmul + softmax) so every stage exports to ONNX.
"""

from __future__ import annotations

import math

from .._lazy import require
from ..errors import DmpoEdgeError
from .peft import LoRALinear, TokenAdapter

torch = require("torch", "models")
nn = torch.nn
F = torch.nn.functional

__all__ = ["VisionTransformer", "VIT_PRESETS", "resize_pos_embed", "load_vit_weights", "convert_hf_vit_state_dict"]

# name -> (embed_dim, depth, num_heads): timm's vit_tiny / vit_small / vit_base
VIT_PRESETS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        if image_size % patch_size:
            raise DmpoEdgeError("vit", f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise DmpoEdgeError("vit", f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)), dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adapter = None  # AdaptFormer branch, parallel to the MLP

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y = x + self.mlp(self.norm2(x))
        if self.adapter is not None:
            y = y + self.adapter(x)
        return y


class VisionTransformer(nn.Module):
    feature_kind = "tokens"

    def __init__(self, image_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=1000):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.patch_embed = PatchEmbed(int(image_size), int(patch_size), self.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, self.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(self.embed_dim, int(num_heads), float(mlp_ratio)) for _ in range(self.depth))
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.head = nn.Linear(self.embed_dim, int(num_classes))
        nn.init.trunc_normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def channels(self, i: int) -> int:
        return self.embed_dim

    def head_modules(self):
        return [self.head]

    def stem(self, x):
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def block(self, i: int, x):
        return self.blocks[i](x)

    def forward_head(self, x):
        return self.head(self.norm(x)[:, 0])

    def forward(self, x):
        x = self.stem(x)
        for i in range(self.depth):
            x = self.block(i, x)
        return self.forward_head(x)

    # -- parameter-efficient tuning ---------------------------------------------------------------------------
    def add_adapters(self, hidden: int, scale: float):
        for blk in self.blocks:
            blk.adapter = TokenAdapter(self.embed_dim, hidden, scale)

    def add_lora(self, rank: int, alpha: float):
        for blk in self.blocks:
            blk.attn.qkv = LoRALinear.wrap(blk.attn.qkv, rank, alpha)
            blk.attn.proj = LoRALinear.wrap(blk.attn.proj, rank, alpha)


def resize_pos_embed(pos_embed, new_grid: int, num_prefix: int = 1):
    """Bicubic resample of a 1 x (prefix + g*g) x D position embedding to ``new_grid`` x ``new_grid`` (timm's way)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.isqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise DmpoEdgeError("vit weights", f"pos_embed has {grid.shape[1]} patch positions, not a square grid")
    if old == new_grid:
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=new_grid < old)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def convert_hf_vit_state_dict(sd: dict) -> dict:
    """Hugging Face ``transformers`` ViT names -> timm names (q, k, v are concatenated into qkv)."""
    out = {}
    pre = "vit." if any(k.startswith("vit.") for k in sd) else ""
    rename = {
        f"{pre}embeddings.cls_token": "cls_token",
        f"{pre}embeddings.position_embeddings": "pos_embed",
        f"{pre}embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        f"{pre}embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        f"{pre}layernorm.weight": "norm.weight",
        f"{pre}layernorm.bias": "norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    layer = {
        "layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    }
    qkv = {}
    for k, v in sd.items():
        if k in rename:
            out[rename[k]] = v
            continue
        if not k.startswith(f"{pre}encoder.layer."):
            continue  # pooler and other heads have no timm counterpart
        rest = k[len(f"{pre}encoder.layer."):]
        idx, name = rest.split(".", 1)
        for part in ("query", "key", "value"):
            if name.startswith(f"attention.attention.{part}."):
                qkv.setdefault((idx, name.rsplit(".", 1)[1]), {})[part] = v
                break
        else:
            for src, dst in layer.items():
                if name.startswith(src + "."):
                    out[f"blocks.{idx}.{dst}.{name[len(src) + 1:]}"] = v
                    break
    for (idx, kind), parts in qkv.items():
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def load_vit_weights(vit: VisionTransformer, source, strict_head: bool = False) -> dict:
    """Load timm-format (or HF transformers ViT) weights into ``vit``: a state dict or a .pth/.bin/.safetensors path.

    The position embedding is resampled when the patch grid differs; the classifier head is skipped when its class
    count differs (a new task). Any other shape mismatch raises, naming the tensor and both shapes.
    Returns {'loaded': [...], 'skipped': [...], 'missing': [...]}.
    """
    from .weights import read_state_dict, load_checked

    sd = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    if any(k.startswith(("vit.embeddings", "embeddings.patch_embeddings")) for k in sd):
        sd = convert_hf_vit_state_dict(sd)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if "pos_embed" in sd and sd["pos_embed"].shape != vit.pos_embed.shape:
        pe = sd["pos_embed"]
        if pe.dim() != 3 or pe.shape[-1] != vit.pos_embed.shape[-1]:
            raise DmpoEdgeError(
                "vit weights",
                f"tensor 'pos_embed' has shape {tuple(pe.shape)} in the weights but {tuple(vit.pos_embed.shape)} in the model. "
                "Expected the same embed dim (pick the matching vit_tiny/small/base)",
            )
        sd["pos_embed"] = resize_pos_embed(pe, vit.patch_embed.grid)
    skipped = []
    if not strict_head:
        for k in ("head.weight", "head.bias"):
            if k in sd and sd[k].shape != vit.state_dict()[k].shape:
                skipped.append(k)
                sd.pop(k)
    report = load_checked(vit, sd, where="vit weights", allow_missing=lambda n: ".lora_" in n or ".adapter." in n or n.startswith("head."))
    report["skipped"] = skipped + report["skipped"]
    return report
