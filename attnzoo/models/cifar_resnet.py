"""CIFAR ResNets (He, Zhang, Ren, Sun, "Deep Residual Learning", CVPR 2016, Sec. 4.2).

Depth 6n + 2: a 3x3 conv with 16 channels, then three stages of n BasicBlocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling
and a linear classifier. Shortcuts are option A (strided identity with zero-padded
channels, parameter-free) by default, as in the paper; ``shortcut="B"`` uses a 1x1 conv + BN
projection where the shape changes.

The attention module sits in every residual block after the last BN and before the
addition with the shortcut (HAM Fig. 4, SE/CBAM placement); ``placement="stage"`` or
``"final"`` moves it to the stage boundaries or the last feature map (see backbone.py).
A conv-level attention (``sk``) replaces the block's first 3x3 conv and its BN. A block-level
attention (bridge) also reads the block's first conv output, after its
BN and ReLU.

Parameters with 10 classes, no attention: resnet20 269,722; resnet32 464,154;
resnet44 658,586; resnet56 853,018; resnet110 1,727,962.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .backbone import Backbone
from .common import AttentionFactory, ConvFactory, attend, make_shortcut


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, attention, + shortcut, ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        shortcut: str,
        make_attention: AttentionFactory,
        make_conv: ConvFactory = None,
    ) -> None:
        super().__init__()
        if make_conv is None:
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
            self.bn1: nn.Module = nn.BatchNorm2d(out_channels)
        else:  # a conv-level attention; sk and splat end in their own BN and ReLU
            self.conv1 = make_conv(in_channels, out_channels, stride)
            self.bn1 = (
                nn.Identity()
                if getattr(self.conv1, "normalizes_output", True)
                else nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attention = make_attention(out_channels, earlier_channels=(out_channels,))
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.relu(self.bn1(self.conv1(x)))
        out = attend(self.attention, self.bn2(self.conv2(mid)), [mid])
        return self.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    stage_names = ("layer1", "layer2", "layer3")
    takes_conv_attention = True

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        shortcut: str = "A",
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        placement: str | None = None,
    ) -> None:
        super().__init__(f"resnet{depth}", in_chans, num_classes)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        self.blocks_per_stage = (depth - 2) // 6
        self.shortcut = shortcut
        self.widths = tuple(widths)
        make_attention = self.block_attention(attention, attention_kwargs, placement)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = (
            self._make_stage(i, 1 if i == 0 else 2, make_attention) for i in range(3)
        )
        self.stage_channels = list(widths)
        self.place_attention()
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]
        self.init_weights()

    def _make_stage(
        self, index: int, stride: int, make_attention: AttentionFactory
    ) -> nn.Sequential:
        in_channels = self.widths[max(index - 1, 0)]
        width = self.widths[index]
        layers = []
        for j in range(self.blocks_per_stage):
            layers.append(
                BasicBlock(
                    in_channels,
                    width,
                    stride if j == 0 else 1,
                    self.shortcut,
                    make_attention,
                    self.make_conv,
                )
            )
            in_channels = width
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}")
    def build(
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        shortcut: str = "A",
        in_chans: int = 3,
        placement: str | None = None,
    ) -> CifarResNet:
        return CifarResNet(
            depth,
            num_classes,
            attention,
            attention_kwargs,
            shortcut,
            in_chans,
            placement=placement,
        )

    build.__doc__ = f"CIFAR ResNet-{depth} (6n+2, n={(depth - 2) // 6})."


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
