"""MobileNetV2 (Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and
Linear Bottlenecks", CVPR 2018, https://arxiv.org/abs/1801.04381), laid out exactly as
``torchvision.models.mobilenet_v2``.

Structure: ``features.0`` is a 3x3 conv-BN-ReLU6 with 32 channels and stride 2;
``features.1`` to ``features.17`` are the 17 inverted residual blocks of the paper's Table 2
(expansion t, output channels c, repeats n, first stride s):

    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
    (6, 160, 3, 2), (6, 320, 1, 1)

each ``conv = [1x1 expand-BN-ReLU6 (absent when t = 1), 3x3 depthwise-BN-ReLU6,
1x1 project, BN]`` with a residual addition when the stride is 1 and the channel count
does not change; ``features.18`` is a 1x1 conv-BN-ReLU6 to 1280 channels, and
``classifier = [Dropout(0.2), Linear(1280, classes)]`` follows global average pooling.
Parameter names match torchvision's, so with ``attention=None`` a torchvision state_dict
loads with ``strict=True`` and the two models compute the same outputs.

Where the attention goes: in every inverted residual block, on the output of the
projection BN, before the residual addition, including the blocks that have no addition
(as GAM's Table 2 does for MobileNetV2). It is the block's ``attention`` attribute, held
outside the ``conv`` Sequential; without attention it is an ``nn.Identity`` and adds no
state_dict keys. A block-level attention (bridge) also reads the expansion output (if any)
and the depthwise output, each after its BN and ReLU6.

Stages (for ``placement="stage"``, ABN and bridge_head): the blocks grouped by the
resolution they run at on ImageNet, i.e. the stage ends where the next block downsamples:

    stage1 = features.1        16 ch, /2
    stage2 = features.2-3      24 ch, /4
    stage3 = features.4-6      32 ch, /8
    stage4 = features.7-13     96 ch, /16 (the 64- and 96-channel groups)
    stage5 = features.14-18  1280 ch, /32 (the last 1x1 conv included)

``stage1`` ... ``stage5`` are unregistered ``nn.Sequential`` views of those ``features``
entries (properties), so the torchvision naming is kept and no parameter appears twice.
``placement="final"`` puts a module on the 1280-channel map before pooling.
``attention_site="expanded"`` (with block placement) moves each block's module from the
block output to the expanded width after the depthwise conv, before the projection: that is
where Coordinate Attention's paper puts it (its MobileNetV2 + CA row, 3.95M parameters with
1000 classes, is exactly ours with ``coord`` there: 3,951,504; at the block output it is
3,546,310).

``stem="cifar"`` (for 32x32 inputs): the first conv has stride 1, and so does the first
block of the second group (``features.2``, 24 channels), as kuangliu/pytorch-cifar and most
CIFAR MobileNetV2 ports do. The total stride is then 8 instead of 32 (a 4x4 last map for a
32x32 image); stages 1 and 2 then share a resolution. The parameter count is unchanged.

Parameters, no attention: 3,504,872 with 1000 classes (torchvision's count) and 2,236,682
with 10 classes. GAM's Table 2 (ImageNet, its column rounds: ResNet-18 is 11.69M) lists
3.51M, about 5K more than torchvision's model; we cannot tell where the difference comes
from. With 1000 classes: SE (r = 16, floor rule) adds 30,013, giving 3.53M as GAM lists;
CBAM adds 31,713 (3.54M; GAM's row lost its numbers in our copy); BAM adds 61,320 in every
block (3.57M) or 3,098 at the stage boundaries (3.51M), neither GAM's 3.54M; one after each
of the seven bottleneck sequences (16 ... 320 channels) adds 38,143, which gives 3.54M
(docs/params.md, note [mobilenet_bam]).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import attention_level, register_model
from .backbone import Backbone
from .common import AttentionFactory, attend, no_attention

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Which groups of the setting make up each stage (see the module docstring).
STAGE_GROUPS = ((0,), (1,), (2,), (3, 4), (5, 6))
STEMS = ("imagenet", "cifar")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never down by more than 10%
    (torchvision's and the TensorFlow reference's rule, used for ``width_mult``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """conv-BN-ReLU6, indexed 0/1/2 like torchvision's ``Conv2dNormActivation``."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            (kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


ATTENTION_SITES = ("output", "expanded")


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6], 3x3 depthwise-BN-ReLU6, 1x1 project-BN, attention, [+ x].

    ``site="expanded"`` puts the attention after the depthwise conv instead, on the expanded
    width, before the projection (Coordinate Attention's MobileNetV2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        make_attention: AttentionFactory,
        site: str = "output",
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"inverted residual stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels
        self.site = site
        earlier = (hidden,) * (len(layers) - 2)
        if site == "expanded":
            self.attention = make_attention(hidden, earlier_channels=())
        else:
            self.attention = make_attention(out_channels, earlier_channels=earlier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, earlier = x, []
        n = len(self.conv)
        for i in range(n - 2):  # expansion and depthwise convs: what a bridge reads
            out = self.conv[i](out)
            earlier.append(out)
        if self.site == "expanded":
            out = self.conv[n - 1](self.conv[n - 2](attend(self.attention, out, [])))
        else:
            out = attend(self.attention, self.conv[n - 1](self.conv[n - 2](out)), earlier)
        return x + out if self.use_res_connect else out


def _stage_view(index: int) -> property:
    return property(
        lambda self: self._stage_views[index],
        doc=f"Stage {index + 1}: an unregistered view of its ``features`` entries.",
    )


class MobileNetV2(Backbone):
    stage_names = ("stage1", "stage2", "stage3", "stage4", "stage5")
    stage1, stage2, stage3, stage4, stage5 = (_stage_view(i) for i in range(5))

    def __init__(
        self,
        num_classes: int = 1000,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
        placement: str | None = None,
        in_chans: int = 3,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        dropout: float = 0.2,
        attention_site: str = "output",
    ) -> None:
        super().__init__("mobilenet_v2", in_chans, num_classes)
        if attention_site not in ATTENTION_SITES:
            raise ValueError(
                f"unknown attention_site {attention_site!r}; choose one of: "
                f"{', '.join(ATTENTION_SITES)}"
            )
        if attention_site == "expanded" and attention is not None:
            if attention_level(attention) != "module":
                raise ValueError(
                    f"attention_site='expanded' takes a drop-in module; {attention!r} reads "
                    f"a block's earlier outputs"
                )
        self.attention_site = attention_site
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.stem_kind = stem
        self.width_mult = width_mult
        self.setting = [list(row) for row in INVERTED_RESIDUAL_SETTING]
        if stem == "cifar":
            self.setting[1][3] = 1  # the 24-channel group keeps the 32x32 resolution
        make_attention = self.block_attention(attention, attention_kwargs, placement)

        self.stem_channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            conv_bn_relu6(in_chans, self.stem_channels, stride=1 if stem == "cifar" else 2)
        ]
        self.stage_bounds: list[tuple[int, int]] = []
        for groups in STAGE_GROUPS:
            start = len(features)
            features += self._make_groups(groups, None, make_attention)
            self.stage_bounds.append((start, len(features)))
        features.append(self._last_conv())
        self.stage_bounds[-1] = (self.stage_bounds[-1][0], len(features))
        self.features = nn.Sequential(*features)
        # Not registered (a tuple): the same modules as ``features``, grouped by stage.
        self._stage_views = tuple(nn.Sequential(*self.features[a:b]) for a, b in self.stage_bounds)
        self.stage_channels = [self._group_channels(groups[-1]) for groups in STAGE_GROUPS[:-1]] + [
            self.last_channel
        ]
        self.place_attention()
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        self.num_features = self.last_channel
        self.init_weights(linear_std=0.01)

    def _group_channels(self, group: int) -> int:
        return make_divisible(self.setting[group][1] * self.width_mult)

    def _make_groups(
        self, groups: tuple[int, ...], first_stride: int | None, make_attention: AttentionFactory
    ) -> list[nn.Module]:
        """The blocks of the given setting groups; ``first_stride`` overrides the stride
        of the first block (None keeps the setting's)."""
        first = groups[0]
        in_channels = self.stem_channels if first == 0 else self._group_channels(first - 1)
        blocks: list[nn.Module] = []
        for g in groups:
            t, _, n, s = self.setting[g]
            out_channels = self._group_channels(g)
            for i in range(n):
                stride = s if i == 0 else 1
                if not blocks and first_stride is not None:
                    stride = first_stride
                blocks.append(
                    InvertedResidual(
                        in_channels, out_channels, stride, t, make_attention, self.attention_site
                    )
                )
                in_channels = out_channels
        return blocks

    def _last_conv(self) -> nn.Sequential:
        return conv_bn_relu6(self._group_channels(len(self.setting) - 1), self.last_channel, 1)

    def make_stage(self, index: int, stride: int) -> nn.Sequential:
        """Stage ``index`` afresh (no attention), its first block at ``stride``; the last
        stage includes the 1x1 conv to 1280 channels."""
        layers = self._make_groups(STAGE_GROUPS[index], stride, no_attention)
        if index == len(STAGE_GROUPS) - 1:
            layers.append(self._last_conv())
        stage = nn.Sequential(*layers)
        self.init_weights(stage, linear_std=0.01)
        return stage

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def get_classifier(self) -> nn.Module:
        return self.classifier


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int = 1000,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    placement: str | None = None,
    in_chans: int = 3,
    stem: str = "imagenet",
    width_mult: float = 1.0,
    dropout: float = 0.2,
    attention_site: str = "output",
) -> MobileNetV2:
    """MobileNetV2 with torchvision's layout (3.5M parameters with 1000 classes)."""
    return MobileNetV2(
        num_classes, attention, attention_kwargs, placement, in_chans, stem, width_mult, dropout,
        attention_site,
    )  # fmt: skip
