"""ResNeXt for CIFAR (Xie, Girshick, Dollar, Tu, He, "Aggregated Residual Transformations
for Deep Neural Networks", CVPR 2017, Sec. 5.3, https://arxiv.org/abs/1611.05431).

ResNeXt-29 (C x d): a 3x3 conv with 64 channels + BN + ReLU, then three stages of three
bottleneck blocks with 256, 512 and 1024 output channels (stride 2 at the start of stages 2
and 3), global average pooling and a linear classifier: 1 + 3 * 3 * 3 + 1 = 29 layers.
``resnext29_8x64d`` has cardinality C = 8 and bottleneck width d = 64, so the grouped 3x3
conv is 8 x 64 = 512 channels wide in stage 1 and doubles with the output width (1024,
2048), as in the paper's CIFAR models and the authors' code.

Block (post-activation, as the paper's Fig. 3(c)):

    mid1 = ReLU(BN(conv1x1(x)))                    D channels
    mid2 = ReLU(BN(groupconv3x3(mid1, groups=C)))  D channels, carries the stride
    out  = BN(conv1x1(mid2))                       out channels
    y    = ReLU(attention(out) + shortcut(x))

``bottleneck_stride="1x1"`` moves the stride of a downsampling block from the grouped 3x3
conv to the first 1x1 conv (ResNet v1 / TensorFlow's layout): same parameters, 2 x MACs
9.80G instead of 10.61G. HAM's Table 4 gives 9.88 GFLOPs for ResNeXt-29, which only this
layout fits (-0.8%; the 3x3 layout is +7.4%): HAM built its networks in TensorFlow, and its
STL-10 Bottleneck ResNets fit the same layout (models/resnet.py). The Table 4 rows use it.

The attention module sits after the last BN, before the addition (as in the CIFAR ResNets
and SE/CBAM). A block-level attention (bridge) also reads ``mid1`` and ``mid2``.
Shortcuts: identity where the shape does not change; ``shortcut="B"`` (default, the paper's
and the code's) is a 1x1 conv + BN projection, ``"A"`` the parameter-free strided identity
with zero-padded channels (stage 1 then pads 64 -> 256 channels).

Parameters with 10 classes, no attention: 34,426,698 with shortcut "B" (the paper quotes
34.4M) and 33,751,370 with "A" (the three 1x1 projections + BN are 675,328). HAM's Table 4
lists 33.81M; its parameter column truncates (ResNet-20's 269,722 is listed as 0.26M), so
neither option matches it and we cannot tell which variant HAM built. SE (r = 16, floor
rule) adds 521,808 and CBAM 522,708 (HAM: +0.51M for both), ECA 45 and HAM 963 (HAM: +0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .backbone import Backbone
from .common import AttentionFactory, attend, check_shortcut, make_shortcut


class ResNeXtBottleneck(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU, conv1x1-BN, attention, + shortcut, ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        cardinality: int,
        group_width: int,
        shortcut: str,
        make_attention: AttentionFactory,
        stride_on: str = "3x3",
    ) -> None:
        super().__init__()
        width = cardinality * group_width
        first, middle = (1, stride) if stride_on == "3x3" else (stride, 1)
        self.conv1 = nn.Conv2d(in_channels, width, 1, first, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, middle, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attention = make_attention(out_channels, earlier_channels=(width, width))
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid1 = self.relu(self.bn1(self.conv1(x)))
        mid2 = self.relu(self.bn2(self.conv2(mid1)))
        out = attend(self.attention, self.bn3(self.conv3(mid2)), [mid1, mid2])
        return self.relu(out + self.shortcut(x))


class CifarResNeXt(Backbone):
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 8,
        bottleneck_width: int = 64,
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        in_chans: int = 3,
        shortcut: str = "B",
        bottleneck_stride: str = "3x3",
    ) -> None:
        super().__init__(f"resnext{depth}_{cardinality}x{bottleneck_width}d", in_chans, num_classes)
        if bottleneck_stride not in ("3x3", "1x1"):
            raise ValueError(
                f"unknown bottleneck_stride {bottleneck_stride!r}; choose one of: 3x3, 1x1"
            )
        self.bottleneck_stride = bottleneck_stride
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"CIFAR ResNeXt depth must be 9n + 2 with n >= 1, got {depth}")
        self.blocks_per_stage = (depth - 2) // 9
        self.cardinality = cardinality
        self.bottleneck_width = bottleneck_width
        self.shortcut = check_shortcut(shortcut)
        self.widths = (64, 256, 512, 1024)
        make_attention = self.block_attention(attention, attention_kwargs, placement)
        self.conv1 = nn.Conv2d(in_chans, self.widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = (
            self._make_stage(i, 1 if i == 0 else 2, make_attention) for i in range(3)
        )
        self.stage_channels = list(self.widths[1:])
        self.place_attention()
        self.fc = nn.Linear(self.widths[-1], num_classes)
        self.num_features = self.widths[-1]
        self.init_weights()

    def _make_stage(
        self, index: int, stride: int, make_attention: AttentionFactory
    ) -> nn.Sequential:
        in_channels, out_channels = self.widths[index], self.widths[index + 1]
        # Group width d in stage 1, doubling with the stage's output width.
        group_width = self.bottleneck_width * 2**index
        layers = []
        for j in range(self.blocks_per_stage):
            layers.append(
                ResNeXtBottleneck(
                    in_channels,
                    out_channels,
                    stride if j == 0 else 1,
                    self.cardinality,
                    group_width,
                    self.shortcut,
                    make_attention,
                    self.bottleneck_stride,
                )
            )
            in_channels = out_channels
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


@register_model("resnext29_8x64d")
def resnext29_8x64d(
    num_classes: int = 10,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    placement: str | None = None,
    in_chans: int = 3,
    shortcut: str = "B",
    bottleneck_stride: str = "3x3",
) -> CifarResNeXt:
    """ResNeXt-29 (8 x 64d) for CIFAR (34.4M parameters)."""
    return CifarResNeXt(
        29, 8, 64, num_classes, attention, attention_kwargs, placement, in_chans, shortcut,
        bottleneck_stride,
    )  # fmt: skip
