"""ImageNet-style ResNets, wide ResNet-18s and ResNeXt-50.

Papers: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
(ResNet-18/34/50/101); Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016 (widening);
Xie, Girshick, Dollar, Tu, He, "Aggregated Residual Transformations for Deep Neural
Networks", CVPR 2017 (ResNeXt-50 32x4d).

Structure and parameter names are torchvision's (``torchvision.models.resnet18`` etc.):
``conv1, bn1, relu, maxpool`` (the stem), ``layer1`` ... ``layer4`` (the stages), ``fc``.
A block has ``conv1, bn1, conv2, bn2`` (BasicBlock) or also ``conv3, bn3`` (Bottleneck, with
the stride on its 3x3 conv as in torchvision's "v1.5"), an ``attention`` module and a
``downsample`` shortcut (None where the shortcut is the identity). Without attention, a
torchvision state_dict loads with ``strict=True`` and gives the same outputs.

Options:
- ``stem="imagenet"`` (default): 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool.
  ``stem="cifar"``: a 3x3 stride-1 conv (still ``conv1``), BN, ReLU and no max-pool, for
  32x32 (CIFAR) inputs. ``stem="cifar_pool"``: the same 3x3 stride-1 conv, BN, ReLU, then
  the ImageNet stem's 3x3 stride-2 max-pool (HAM's STL-10 networks at 96x96, below).
- ``bottleneck_stride="3x3"`` (default, torchvision's "v1.5"): a downsampling Bottleneck
  strides in its 3x3 conv. ``"1x1"``: in its first 1x1 conv, as the original ResNet and the
  Keras/TensorFlow ResNet-50 (v1), whose 3x3 conv then runs at the lower resolution. Same
  parameters, fewer FLOPs; no effect on BasicBlock networks.
- ``shortcut="B"`` (default): a 1x1 conv + BN projection where the shape changes
  (torchvision's ``downsample``). ``shortcut="A"``: parameter-free, a strided identity with
  zero-padded channels (``PadShortcut``); this also pads layer1's first Bottleneck from 64
  to 256 channels at stride 1.

Attention: in every block, after the last BN and before the addition with the shortcut
(``placement="block"``); ``"stage"`` and ``"final"`` move it to the stage boundaries or the
last feature map (see backbone.py). A conv-level attention (``sk``) replaces the block's 3x3 conv and the BN after it: conv2 and
bn2 of a Bottleneck (at the block's stride and groups), conv1 and bn1 of a BasicBlock (as
timm's SK ResNets). A block-level attention (bridge) also reads the block's
earlier conv outputs after their BN and ReLU: relu(bn1) in a BasicBlock, relu(bn1) and
relu(bn2) in a Bottleneck. ``make_stage`` builds a fresh stage, so model-level attentions
(abn, bridge_head) wrap these backbones too.

Widening (our reading of "WideResNet-18 (widen=1.5)" in seed 000 Table II and
"WideResNet18-2" in HAM Table 5): every width of ResNet-18 is multiplied by the factor, the
stem's 64 channels included, so ``wide_resnet18_2`` has a 128-channel stem and stages of
128, 256, 512 and 1024 channels (Zagoruyko and Komodakis widen every layer of a BasicBlock
network). torchvision's ``wide_resnet50_2`` differs: it widens only the inner 3x3 width of
a Bottleneck. HAM's 43.98M (10 classes) does not pin the stem down exactly: with the widened
stem, ``stem="cifar"`` and ``shortcut="A"`` give 43,971,210 (43.97M; its "+SE" row, 44.32M,
matches), ``stem="imagenet"`` 43,986,570 (43.99M); a 64-channel stem is further off
(43,895,626 with option A, 44,595,786 with B).

Parameters, no attention, 1000 classes (torchvision's setting, ``stem="imagenet"``,
``shortcut="B"``): resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032;
resnet101 44,549,160; resnext50_32x4d 25,028,904; wide_resnet18_1_5 25,901,896;
wide_resnet18_2 45,693,032.

HAM's STL-10 networks (Tables 5-6, 96x96 inputs): ``stem="cifar_pool"``, ``shortcut="A"``,
``bottleneck_stride="1x1"``. The parameters alone fit any 3x3 stem (below); the paper's
GFLOPs fix the rest. A 3x3 stride-1 stem without downsampling gives about 4x the paper's
GFLOPs (ResNet-18: 9.88 vs 2.53); one stride-2 step after the stem (the max-pool) brings
every BasicBlock row within -1.4% (2.50 / 5.21 / 9.92 against 2.53 / 5.27 / 10.03), and the
Bottleneck rows (5.34 / 10.79 / 5.54 against 5.06 / 10.56 / 4.93) come within -1.4% too
once they stride in the first 1x1 conv (5.00 / 10.45 / 4.86): the paper reproduced every
network in TensorFlow, whose Keras ResNet-50 strides there. The remaining ~1% is what a
TensorFlow profile adds for batch norm, ReLU and additions, which we do not count. A stride-2
stem conv instead of the max-pool is 0.03 GFLOPs further off on every row.

Parameters, no attention, 10 classes, ``stem="cifar"`` or ``"cifar_pool"``, ``shortcut="A"``
(the setting of HAM's STL-10 Tables 5-6): resnet18 11,000,138 (HAM: 11.00M); resnet34 21,108,298 (21.11M);
resnet50 20,744,266 (20.73M); resnet101 39,736,394 (39.72M); wide_resnet18_2 43,971,210
(43.98M); resnext50_32x4d 20,216,138 (21.14M). ResNet-18 and -34 match when rounded to
0.01M (not truncated: ResNet-34 would give 21.10M), and HAM's "Memory(M)" column, which is
parameters x 4 bytes in MiB, confirms this setting (ResNet-18: 41.96; a 7x7 stem gives
41.99). The other rows match no stem/shortcut setting (ResNeXt-50: no ResNeXt-50 32x4d
has HAM's count, see docs/params.md, note [resnext50]). GAM's tables use torchvision's
setting for ImageNet and ``stem="cifar"``, ``shortcut="B"`` with 100 classes for CIFAR-100
(ResNet-50: 23,705,252, GAM: 23.71M). In GAM's tables the ABN rows match with
``map_kernel_size=3`` (21.61M, 43.58M; abn.py has the numbers) and the SE rows only with bias-free FC layers, which
``se`` does not offer (ours: 11.78M, 28.09M, 26.24M; GAM: 11.78M, 28.07M, 26.22M).
tests/models/test_resnet.py checks every table row that matches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .backbone import Backbone
from .common import (
    AttentionFactory,
    ConvFactory,
    attend,
    check_shortcut,
    make_shortcut,
    no_attention,
)

STEMS = ("imagenet", "cifar", "cifar_pool")
BOTTLENECK_STRIDES = ("3x3", "1x1")


def _downsample(
    shortcut: str, in_channels: int, out_channels: int, stride: int
) -> nn.Module | None:
    """torchvision's ``downsample``: None for an identity shortcut."""
    module = make_shortcut(shortcut, in_channels, out_channels, stride)
    return None if isinstance(module, nn.Identity) else module


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, attention, + shortcut, ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "B",
        make_attention: AttentionFactory = no_attention,
        groups: int = 1,
        base_width: int = 64,
        make_conv: ConvFactory = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if make_conv is None:
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1: nn.Module = nn.BatchNorm2d(planes)
        else:  # a conv-level attention; sk and splat end in their own BN and ReLU
            self.conv1 = make_conv(inplanes, planes, stride)
            self.bn1 = (
                nn.Identity()
                if getattr(self.conv1, "normalizes_output", True)
                else nn.BatchNorm2d(planes)
            )
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.attention = make_attention(planes, earlier_channels=(planes,))
        self.downsample = _downsample(shortcut, inplanes, planes, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        mid = self.relu(self.bn1(self.conv1(x)))
        out = attend(self.attention, self.bn2(self.conv2(mid)), [mid])
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride, groups)-BN-ReLU-conv1x1-BN, attention, + shortcut, ReLU.

    ``stride_on="1x1"`` moves the stride to the first 1x1 conv (ResNet v1, Keras).

    Inner width ``int(planes * base_width / 64) * groups`` (torchvision's rule: ``planes`` for
    ResNet-50/101, 128 per 64 planes for ResNeXt-50 32x4d); output ``4 * planes``.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        shortcut: str = "B",
        make_attention: AttentionFactory = no_attention,
        groups: int = 1,
        base_width: int = 64,
        stride_on: str = "3x3",
        make_conv: ConvFactory = None,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * self.expansion
        first, middle = (1, stride) if stride_on == "3x3" else (stride, 1)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride=first, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        if make_conv is None:
            self.conv2 = nn.Conv2d(width, width, 3, middle, 1, groups=groups, bias=False)
            self.bn2: nn.Module = nn.BatchNorm2d(width)
        else:  # a conv-level attention; sk and splat end in their own BN and ReLU
            self.conv2 = make_conv(width, width, middle, groups)
            self.bn2 = (
                nn.Identity()
                if getattr(self.conv2, "normalizes_output", True)
                else nn.BatchNorm2d(width)
            )
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attention = make_attention(out_channels, earlier_channels=(width, width))
        self.downsample = _downsample(shortcut, inplanes, out_channels, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        mid1 = self.relu(self.bn1(self.conv1(x)))
        mid2 = self.relu(self.bn2(self.conv2(mid1)))
        out = attend(self.attention, self.bn3(self.conv3(mid2)), [mid1, mid2])
        return self.relu(out + identity)


class ResNet(Backbone):
    stage_names = ("layer1", "layer2", "layer3", "layer4")
    takes_conv_attention = True

    def __init__(
        self,
        name: str,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        shortcut: str = "B",
        stem: str = "imagenet",
        in_chans: int = 3,
        widths: tuple[int, int, int, int] = (64, 128, 256, 512),
        stem_width: int = 64,
        groups: int = 1,
        width_per_group: int = 64,
        bottleneck_stride: str = "3x3",
    ) -> None:
        super().__init__(name, in_chans, num_classes)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        if bottleneck_stride not in BOTTLENECK_STRIDES:
            raise ValueError(
                f"unknown bottleneck_stride {bottleneck_stride!r}; choose one of: "
                f"{', '.join(BOTTLENECK_STRIDES)}"
            )
        self.bottleneck_stride = bottleneck_stride
        self.shortcut = check_shortcut(shortcut)
        self.stem = stem
        self.block = block
        self.layers = tuple(layers)
        self.widths = tuple(widths)
        self.stem_width = stem_width
        self.groups = groups
        self.width_per_group = width_per_group
        make_attention = self.block_attention(attention, attention_kwargs, placement)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)
            self.maxpool = (
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
                if stem == "cifar_pool"
                else nn.Identity()
            )
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_stage(i, 1 if i == 0 else 2, make_attention) for i in range(4)
        )
        self.stage_channels = [w * block.expansion for w in self.widths]
        self.place_attention()
        self.num_features = self.stage_channels[-1]
        self.fc = nn.Linear(self.num_features, num_classes)
        self.init_weights()

    def _stage_in_channels(self, index: int) -> int:
        return self.stem_width if index == 0 else self.widths[index - 1] * self.block.expansion

    def _make_stage(
        self, index: int, stride: int, make_attention: AttentionFactory
    ) -> nn.Sequential:
        in_channels = self._stage_in_channels(index)
        planes = self.widths[index]
        blocks = []
        for j in range(self.layers[index]):
            blocks.append(
                self.block(
                    in_channels,
                    planes,
                    stride if j == 0 else 1,
                    self.shortcut,
                    make_attention,
                    self.groups,
                    self.width_per_group,
                    **({"stride_on": self.bottleneck_stride} if self.block is Bottleneck else {}),
                    make_conv=self.make_conv,
                )
            )
            in_channels = planes * self.block.expansion
        return nn.Sequential(*blocks)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _register(name: str, doc: str, block: type, layers: tuple, **arch) -> None:
    @register_model(name)
    def build(
        num_classes: int = 1000,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        shortcut: str = "B",
        stem: str = "imagenet",
        in_chans: int = 3,
        bottleneck_stride: str = "3x3",
    ) -> ResNet:
        return ResNet(
            name,
            block,
            layers,
            num_classes=num_classes,
            attention=attention,
            attention_kwargs=attention_kwargs,
            placement=placement,
            shortcut=shortcut,
            stem=stem,
            in_chans=in_chans,
            bottleneck_stride=bottleneck_stride,
            **arch,
        )

    build.__name__ = name
    build.__doc__ = doc


def _widened(factor: float) -> dict:
    return {
        "widths": tuple(int(w * factor) for w in (64, 128, 256, 512)),
        "stem_width": int(64 * factor),
    }


_register("resnet18", "ResNet-18 (BasicBlock, 2-2-2-2).", BasicBlock, (2, 2, 2, 2))
_register("resnet34", "ResNet-34 (BasicBlock, 3-4-6-3).", BasicBlock, (3, 4, 6, 3))
_register("resnet50", "ResNet-50 (Bottleneck, 3-4-6-3).", Bottleneck, (3, 4, 6, 3))
_register("resnet101", "ResNet-101 (Bottleneck, 3-4-23-3).", Bottleneck, (3, 4, 23, 3))
_register(
    "wide_resnet18_1_5",
    "ResNet-18 with every width x1.5 (stem 96, stages 96-192-384-768).",
    BasicBlock,
    (2, 2, 2, 2),
    **_widened(1.5),
)
_register(
    "wide_resnet18_2",
    "ResNet-18 with every width x2 (stem 128, stages 128-256-512-1024).",
    BasicBlock,
    (2, 2, 2, 2),
    **_widened(2),
)
_register(
    "resnext50_32x4d",
    "ResNeXt-50 32x4d (Bottleneck, 3-4-6-3, 32 groups of width 4 in layer1).",
    Bottleneck,
    (3, 4, 6, 3),
    groups=32,
    width_per_group=4,
)
