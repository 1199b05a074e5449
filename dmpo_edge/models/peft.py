"""Parameter-efficient tuning: parallel bottleneck adapters (AdaptFormer-style) and LoRA.

LoRA layers subclass the layer they wrap and keep its parameter names (``weight``, ``bias``) so that
pre-trained state dicts (timm, EfficientNet) load into a tuned model unchanged; only ``lora_a`` and
``lora_b`` are new. Up-projections start at zero: a freshly injected model computes exactly what the
pre-trained backbone computed.
"""

from __future__ import annotations

import math

from .._lazy import require

torch = require("torch", "models")
nn = torch.nn
F = torch.nn.functional

__all__ = ["LoRALinear", "LoRAConv1x1", "TokenAdapter", "ConvAdapter", "fold_lora", "peft_parameter_names"]


def _init_lora(layer, fan_in: int, fan_out: int, rank: int, alpha: float, kernel: tuple = ()) -> None:
    """Add the low-rank pair ``lora_a`` (random) / ``lora_b`` (zero: the wrapped layer is unchanged at start)."""
    layer.rank = int(rank)
    layer.scaling = float(alpha) / layer.rank
    layer.lora_a = nn.Parameter(torch.empty(layer.rank, fan_in, *kernel))
    layer.lora_b = nn.Parameter(torch.zeros(fan_out, layer.rank, *kernel))
    nn.init.kaiming_uniform_(layer.lora_a, a=math.sqrt(5))


def _copy_weights(layer, weight, bias):
    """Copy ``weight`` / ``bias`` into ``layer`` (no autograd history) and return it."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LoRALinear(nn.Linear):
    """``W x + b + (alpha / r) * B A x``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        _init_lora(self, in_features, out_features, rank, alpha)

    @classmethod
    def wrap(cls, base, rank: int, alpha: float) -> "LoRALinear":
        layer = cls(base.in_features, base.out_features, rank, alpha, bias=base.bias is not None)
        return _copy_weights(layer, base.weight, base.bias)

    def merged_weight(self):
        return self.weight + torch.matmul(self.lora_b, self.lora_a) * self.scaling

    def forward(self, x):
        # one layer with the merged weight: batch-independent extra work, and an exporter folds it to a constant
        return F.linear(x, self.merged_weight(), self.bias)

    def folded(self):
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        return _copy_weights(plain, self.merged_weight(), self.bias)


class LoRAConv1x1(nn.Conv2d):
    """LoRA on a 1 x 1, stride-1 convolution (the expand / project convs of an MBConv block)."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, alpha: float, bias: bool = False):
        super().__init__(in_channels, out_channels, 1, bias=bias)
        _init_lora(self, in_channels, out_channels, rank, alpha, kernel=(1, 1))

    @classmethod
    def wrap(cls, base, rank: int, alpha: float) -> "LoRAConv1x1":
        layer = cls(base.in_channels, base.out_channels, rank, alpha, bias=base.bias is not None)
        return _copy_weights(layer, base.weight, base.bias)

    def merged_weight(self):
        delta = torch.matmul(self.lora_b.flatten(1), self.lora_a.flatten(1)) * self.scaling
        return self.weight + delta.reshape(self.weight.shape)

    def forward(self, x):
        return F.conv2d(x, self.merged_weight(), self.bias)

    def folded(self):
        plain = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None)
        return _copy_weights(plain, self.merged_weight(), self.bias)


class TokenAdapter(nn.Module):
    """AdaptFormer parallel adapter on a token sequence: ``s * up(relu(down(x)))``."""

    def __init__(self, dim: int, hidden: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.relu(self.down(x))) * self.scale


class ConvAdapter(nn.Module):
    """Parallel 1 x 1-conv bottleneck beside an MBConv block (stride and channel change matched)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        # a strided 1x1 conv gives ceil(H / s), the size the block's 'same' padding gives
        self.down = nn.Conv2d(in_channels, hidden, 1, stride=stride)
        self.up = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.relu(self.down(x))) * self.scale


def fold_lora(model):
    """A deployment copy of ``model`` with every LoRA layer merged into a plain layer (same function, no LoRA)."""
    import copy

    folded = copy.deepcopy(model)
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (LoRALinear, LoRAConv1x1)):
                setattr(parent, name, child.folded())
    return folded


def peft_parameter_names(model) -> set:
    """Names of the parameters added by tuning (adapters, LoRA): everything else in a backbone is pre-trained."""
    return {n for n, _ in model.named_parameters() if ".lora_" in n or ".adapter." in n}
