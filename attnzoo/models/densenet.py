"""DenseNet-BC for CIFAR (Huang, Liu, van der Maaten, Weinberger, "Densely Connected
Convolutional Networks", CVPR 2017, https://arxiv.org/abs/1608.06993).

DenseNet-BC (L, k): a 3x3 conv with 2k channels, then three dense blocks of
n = (L - 4) / 6 bottleneck layers, separated by transitions, a final BN-ReLU, global average
pooling and a linear classifier. ``densenet_bc_100_12`` is L = 100, k = 12: n = 16 layers per
block, compression 0.5.

    dense layer: new = conv3x3_{4k->k}(ReLU(BN(conv1x1_{C->4k}(ReLU(BN(x))))))
                 (its input is the concatenation of the block input and all earlier layers)
    dense block: out = attention([x, new_1, ..., new_n])      C + n k channels
    transition:  conv1x1_{C->floor(0.5 C)}(ReLU(BN(x))), then 2x2 average pooling

Channels: 24 -> block 1 -> 216 -> transition -> 108 -> block 2 -> 300 -> 150 -> block 3 -> 342.

Where the attention goes (``placement="block"``): after each dense block, on its
concatenated output, before the transition (three modules: 216, 300 and 342 channels; the
last one comes before the final BN-ReLU). The literal analogue of a ResNet block, one module
per dense layer on its 12 new channels, would give SE/CBAM (r = 16) a hidden width of
max(1, 12 // 16) = 1 and 48 near-degenerate modules, and would re-weight each feature
only once, when it is made; a module on the dense block's output sees every feature of the
block, at the width the next transition compresses.

Stages: ``stage1`` = dense block 1; ``stage2`` = transition 1 + dense block 2; ``stage3`` =
transition 2 + dense block 3. A stage thus starts by downsampling (the transition's pooling
is the stage's stride, as the first conv's stride is in a ResNet), so ``placement="stage"``
puts modules on the outputs of dense blocks 1 and 2 (216, 300 channels), where the network
downsamples next; these are the same points as the first two ``"block"`` modules, so
"stage" is "block" without the module on the last dense block. ``placement="final"`` puts
one module on the last map after the final BN-ReLU (which ``forward_stage`` applies at the
end of the last stage). ABN's branch (``make_stage(2, stride=1)``) is transition 2 without
pooling + a fresh dense block 3, on the 16x16 output of dense block 2.

Bridge (block-level) attention is refused: a dense block has no residual branch whose
intermediate outputs a bridge could bring back, since every layer's output is already
part of the block output the module sees.

Parameters with 10 classes, no attention: 769,162; the paper's Table 2 rounds it to 0.8M.
A dense layer reading C channels has
50 C + 5,280 (BN 2C, 1x1 conv 48C, BN 96, 3x3 conv 48 x 12 x 9 = 5,184). Breakdown: stem
conv 648; dense blocks 175,680 + 242,880 + 276,480; transitions 23,760 + 45,600 (BN 2C +
conv C x C/2); final BN 684; classifier 342 x 10 + 10 = 3,430. SE (r = 16, floor rule)
in the three block positions adds 31,690.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..registry import attention_level, register_model
from .backbone import Backbone
from .common import AttentionFactory


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k)-BN-ReLU-conv3x3 (k): the k new channels of one layer."""

    def __init__(
        self, in_channels: int, growth_rate: int, bottleneck_factor: int, dropout: float
    ) -> None:
        super().__init__()
        width = bottleneck_factor * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth_rate, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.norm1(x)))
        return self.dropout(self.conv2(self.relu(self.norm2(out))))


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each reading everything before it, then attention on
    the concatenation."""

    def __init__(
        self,
        in_channels: int,
        num_layers: int,
        growth_rate: int,
        make_attention: AttentionFactory,
        bottleneck_factor: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bottleneck_factor, dropout)
            for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate
        self.attention = make_attention(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.attention(torch.cat(features, 1))


def transition(in_channels: int, out_channels: int, stride: int = 2) -> nn.Sequential:
    """BN-ReLU-conv1x1, then average pooling by ``stride`` (none for stride 1)."""
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pool=nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
        )
    )


class DenseNetBC(Backbone):
    stage_names = ("stage1", "stage2", "stage3")

    def __init__(
        self,
        depth: int = 100,
        growth_rate: int = 12,
        num_classes: int = 10,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        in_chans: int = 3,
        compression: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(f"densenet_bc_{depth}_{growth_rate}", in_chans, num_classes)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if attention is not None and attention_level(attention) == "block":
            raise ValueError(
                f"attention {attention!r} reads a residual block's intermediate outputs; "
                f"{self.name} has no residual blocks. Use a module-level attention (e.g. se, "
                "cbam) or a model-level one (abn, bridge_head)"
            )
        self.layers_per_block = (depth - 4) // 6
        self.growth_rate = growth_rate
        self.compression = compression
        self.dropout = dropout
        # Channels entering each dense block, and leaving it.
        self.block_in: list[int] = []
        self.block_out: list[int] = []
        channels = 2 * growth_rate
        for i in range(3):
            if i > 0:
                channels = int(compression * channels)
            self.block_in.append(channels)
            channels += self.layers_per_block * growth_rate
            self.block_out.append(channels)
        make_attention = self.block_attention(attention, attention_kwargs, placement)
        self.conv1 = nn.Conv2d(in_chans, 2 * growth_rate, 3, 1, 1, bias=False)
        self.stage1, self.stage2, self.stage3 = (
            self._make_stage(i, 1 if i == 0 else 2, make_attention) for i in range(3)
        )
        self.bn = nn.BatchNorm2d(self.block_out[-1])
        self.relu = nn.ReLU(inplace=True)
        self.stage_channels = list(self.block_out)
        self.place_attention()
        self.fc = nn.Linear(self.block_out[-1], num_classes)
        self.num_features = self.block_out[-1]
        self.init_weights()

    def _make_stage(
        self, index: int, stride: int, make_attention: AttentionFactory
    ) -> nn.Sequential:
        parts: OrderedDict[str, nn.Module] = OrderedDict()
        if index > 0:
            parts["transition"] = transition(
                self.block_out[index - 1], self.block_in[index], stride
            )
        parts["block"] = DenseBlock(
            self.block_in[index],
            self.layers_per_block,
            self.growth_rate,
            make_attention,
            dropout=self.dropout,
        )
        return nn.Sequential(parts)

    def make_stage(self, index: int, stride: int) -> nn.Sequential:
        """Stage ``index`` afresh, no attention; ``stride`` is its transition's pooling
        (stage 1 has no transition, so only stride 1)."""
        if stride not in (1, 2) or (index == 0 and stride != 1):
            valid = "1" if index == 0 else "1 or 2"
            raise ValueError(f"stage {index + 1} of {self.name} takes stride {valid}, got {stride}")
        return super().make_stage(index, stride)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def _after_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The final BN-ReLU of the pre-activation net; a ``"final"`` attention follows it."""
        return self.relu(self.bn(x))


@register_model("densenet_bc_100_12")
def densenet_bc_100_12(
    num_classes: int = 10,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    placement: str | None = None,
    in_chans: int = 3,
    dropout: float = 0.0,
) -> DenseNetBC:
    """DenseNet-BC (L = 100, k = 12) for CIFAR (0.8M parameters)."""
    return DenseNetBC(
        100, 12, num_classes, attention, attention_kwargs, placement, in_chans, 0.5, dropout
    )
