"""CIFAR ResNets (He, Zhang, Ren, Sun, "Deep Residual Learning", CVPR 2016, Sec. 4.2).

Depth 6n + 2: a 3x3 conv with 16 channels, then three stages of n BasicBlocks with
16, 32 and 64 channels (stride 2 at the start of stages 2 and 3), global average pooling
and a linear classifier. Shortcuts are option A (strided identity with zero-padded
channels, parameter-free) by default, as in the paper; ``shortcut="B"`` uses a 1x1 conv + BN
projection where the shape changes.

The attention module sits in every residual block after the last BN and before the
addition with the shortcut (HAM Fig. 4, SE/CBAM placement).

Parameters with 10 classes, no attention: resnet20 269,722; resnet32 464,154;
resnet44 658,586; resnet56 853,018; resnet110 1,727,962.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .common import AttentionFactory, attention_factory, check_model_input, make_shortcut


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, attention, + shortcut, ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        shortcut: str,
        make_attention: AttentionFactory,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attention = make_attention(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attention(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        shortcut: str = "A",
        in_chans: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.in_chans = in_chans
        self.name = f"resnet{depth}"
        make_attention = attention_factory(attention, attention_kwargs)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = widths[0]
        for i, width in enumerate(widths):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_channels, width, stride, shortcut, make_attention))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self.num_features = in_channels
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.num_features > 1:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(x, self.in_chans, self.name)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def _register(depth: int) -> None:
    @register_model(f"resnet{depth}")
    def build(
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        shortcut: str = "A",
        in_chans: int = 3,
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, attention, attention_kwargs, shortcut, in_chans)

    build.__doc__ = f"CIFAR ResNet-{depth} (6n+2, n={(depth - 2) // 6})."


for _depth in (20, 32, 44, 56, 110):
    _register(_depth)
