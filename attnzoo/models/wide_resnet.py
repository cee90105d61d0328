"""Wide residual networks for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks",
BMVC 2016, https://arxiv.org/abs/1605.07146).

WRN-d-k: a 3x3 conv with 16 channels, then three stages of n = (d - 4) / 6 pre-activation
blocks with 16k, 32k and 64k channels (stride 2 at the start of stages 2 and 3), a final
BN-ReLU, global average pooling and a linear classifier. ``wrn16_8`` is d = 16, k = 8:
two blocks per stage, widths 16 -> 128 -> 256 -> 512.

Block (pre-activation, "B(3,3)" in the paper):

    pre = ReLU(BN(x))
    out = conv3x3(dropout(ReLU(BN(conv3x3(pre)))))
    y   = attention(out) + shortcut

The shortcut is the identity where the shape does not change. Where it does,
``shortcut="B"`` (default) is a 1x1 conv without BN applied to ``pre``, the pre-activated
input, as the authors' code does (the block's first BN-ReLU is shared by both paths);
``shortcut="A"`` is the parameter-free strided identity with zero-padded channels, on ``x``.

Where the attention goes: a pre-activation block has no BN after its last conv, so the
module sits on the residual branch output, i.e. right after the second conv and before the
addition (the same point as "after the last BN" in a post-activation ResNet: the end of
the residual branch). A block-level attention (bridge) also reads the first conv's output
after its BN and ReLU (what the second conv reads). ``placement="stage"`` puts a module on
the (un-normalised) outputs of stages 1 and 2; ``"final"`` puts one on the last feature
map after the final BN-ReLU, just before pooling. The final BN-ReLU belongs to the last
stage's forward (``forward_stage``), so ABN's and bridge_head's views of the last stage
include it; ``make_stage`` (ABN's branch) builds the blocks only.

Dropout between the two convs is 0 by default (the paper's best CIFAR numbers use 0.3
for some widths; ``dropout=`` sets it).

Parameters with 10 classes, no attention: 10,961,370 with shortcut "B" (the paper quotes
11.0M) and 10,795,482 with "A". HAM's Table 4 lists 10.79M for WRN-16-8: its parameter
column truncates (ResNet-20's 269,722 is listed as 0.26M), so it matches option A, not the
paper's projections. SE (r = 16, floor rule) adds 87,920 and CBAM 88,520 (ours with "A":
10.88M; HAM: 10.87M for both, a gap of about 4K we cannot attribute); ECA adds 30 and
HAM 642 (HAM: 10.79M for both).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .backbone import Backbone
from .common import AttentionFactory, PadShortcut, attend, check_shortcut


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, attention, + shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        shortcut: str,
        make_attention: AttentionFactory,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.attention = make_attention(out_channels, earlier_channels=(out_channels,))
        # The 1x1 projection reads the pre-activated input (authors' code); option A and the
        # identity read the block input itself.
        self.projects = stride != 1 or in_channels != out_channels
        if not self.projects:
            self.shortcut: nn.Module = nn.Identity()
        elif check_shortcut(shortcut) == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        self.shortcut_reads_preactivation = self.projects and shortcut == "B"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        mid = self.relu(self.bn2(self.conv1(pre)))
        out = attend(self.attention, self.conv2(self.dropout(mid)), [mid])
        return out + self.shortcut(pre if self.shortcut_reads_preactivation else x)


class WideResNet(Backbone):
    stage_names = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 8,
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        in_chans: int = 3,
        shortcut: str = "B",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(f"wrn{depth}_{widen_factor}", in_chans, num_classes)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive int, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.shortcut = check_shortcut(shortcut)
        self.dropout = dropout
        self.blocks_per_stage = (depth - 4) // 6
        self.widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        make_attention = self.block_attention(attention, attention_kwargs, placement)
        self.conv1 = nn.Conv2d(in_chans, self.widths[0], 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3 = (
            self._make_stage(i, 1 if i == 0 else 2, make_attention) for i in range(3)
        )
        self.bn = nn.BatchNorm2d(self.widths[-1])
        self.relu = nn.ReLU(inplace=True)
        self.stage_channels = list(self.widths[1:])
        self.place_attention()
        self.fc = nn.Linear(self.widths[-1], num_classes)
        self.num_features = self.widths[-1]
        self.init_weights()

    def _make_stage(
        self, index: int, stride: int, make_attention: AttentionFactory
    ) -> nn.Sequential:
        in_channels, width = self.widths[index], self.widths[index + 1]
        layers = []
        for j in range(self.blocks_per_stage):
            layers.append(
                PreActBlock(
                    in_channels,
                    width,
                    stride if j == 0 else 1,
                    self.shortcut,
                    make_attention,
                    self.dropout,
                )
            )
            in_channels = width
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def _after_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The final BN-ReLU of the pre-activation net; a ``"final"`` attention follows it."""
        return self.relu(self.bn(x))


@register_model("wrn16_8")
def wrn16_8(
    num_classes: int = 10,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    placement: str | None = None,
    in_chans: int = 3,
    shortcut: str = "B",
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-16-8 for CIFAR (depth 16, widen factor 8, 11.0M parameters)."""
    return WideResNet(
        16,
        8,
        num_classes,
        attention,
        attention_kwargs,
        placement,
        in_chans,
        shortcut,
        dropout,
    )
