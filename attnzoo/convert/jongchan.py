"""Source "jongchan": Jongchan/attention-module, the official CBAM and BAM code
(``MODELS/model_resnet.py``, ``MODELS/cbam.py``, ``MODELS/bam.py``).

Their ``ResidualNet("ImageNet", depth, 1000, att_type)`` is a torchvision-layout ResNet
(7x7 stem, Bottleneck stride on the 3x3 conv, 1x1-conv + BN projection shortcuts) with:

- CBAM (``att_type="CBAM"``) in every block, after the last BN and before the addition, as
  ``layerX.Y.cbam``: ``ChannelGate.mlp`` = Sequential(Flatten, Linear(C, C // 16), ReLU,
  Linear(C // 16, C)), so keys ``ChannelGate.mlp.1.*`` and ``.3.*`` (our ``mlp.0`` / ``mlp.2``
  are the equivalent 1x1 convs: the weights gain two trailing 1-dims), and
  ``SpatialGate.spatial`` = BasicConv(2, 1, 7): ``.conv.weight`` (no bias) and ``.bn.*``
  (momentum 0.01). The spatial descriptor is [max; mean] (``ChannelPool``); ours is [mean;
  max] unless the model was built with ``pool_order="max_mean"``, so the conv's two input
  channels are swapped on the way in.
- BAM (``att_type="BAM"``) after layer1, layer2 and layer3, as ``bam1``..``bam3`` (our
  ``stage_attention.0``..``2``): ``channel_att.gate_c`` = Flatten, ``gate_c_fc_0``,
  ``gate_c_bn_1`` (BatchNorm1d), ReLU, ``gate_c_fc_final``; ``spatial_att.gate_s`` =
  ``gate_s_conv_reduce0`` (1x1), ``gate_s_bn_reduce0``, ReLU, then twice
  ``gate_s_conv_di_{i}`` (3x3, dilation 4), ``gate_s_bn_di_{i}``, ReLU, and
  ``gate_s_conv_final`` (1x1 to one channel). The official forward is F * (1 +
  sigmoid(M_c * M_s)), which our BAM computes with ``combine="product"`` only: a strict load
  refuses a model built with the default ``combine="sum"`` (Eq. 2 of the paper).
- no attention (``att_type=None``): a plain ResNet.

The official ``ChannelGate`` of BAM averages with ``avg_pool2d(F, H, stride=H)``, the same as
our global average on the square maps of 224x224 inputs (see attnzoo/attention/bam.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..attention.bam import BAM
from ..attention.cbam import CBAM
from .core import (
    AttentionMapping,
    Backbone,
    Expected,
    Source,
    Transform,
    as_conv1x1,
    register_source,
    swap_pair,
)


def _block_prefix(ours: str, name: str) -> str:
    # "layer1.0.attention." -> "layer1.0.<name>."
    return ours[: -len("attention.")] + name + "."


class JongchanCBAM(AttentionMapping):
    name = "cbam"
    label = "CBAM in every block"
    marker = re.compile(r"^layer\d\.\d+\.cbam\.")

    def official_prefix(self, ours: str) -> str:
        return _block_prefix(ours, "cbam")

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        if rest in ("mlp.0.weight", "mlp.2.weight"):
            return f"ChannelGate.mlp.{1 if rest[4] == '0' else 3}.weight", as_conv1x1
        if rest in ("mlp.0.bias", "mlp.2.bias"):
            return f"ChannelGate.mlp.{1 if rest[4] == '0' else 3}.bias", None
        if rest == "spatial.conv.weight":
            ours_first = getattr(module.spatial, "pool_order", "mean_max") == "mean_max"
            return "SpatialGate.spatial.conv.weight", swap_pair if ours_first else None
        if rest.startswith("spatial.bn."):
            return "SpatialGate.spatial.bn." + rest[len("spatial.bn.") :], None
        return None  # e.g. the adaptive mix of HAM's CBAM variant: no official counterpart

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        kwargs: dict = {}
        recommended: dict = {}
        first = state.get("layer1.0.cbam.ChannelGate.mlp.1.weight")
        if first is not None and first.dim() == 2:
            hidden, channels = first.shape
            if hidden != max(1, channels // 16) and channels % hidden == 0:
                kwargs["reduction"] = channels // hidden
        conv = state.get("layer1.0.cbam.SpatialGate.spatial.conv.weight")
        if conv is None:
            kwargs["spatial"] = False
        else:
            if conv.shape[-1] != 7:
                kwargs["kernel_size"] = int(conv.shape[-1])
            recommended["bn_momentum"] = 0.01
        return Expected(backbone, "cbam", kwargs, recommended, label=self.label)

    def notes(self, module: nn.Module) -> list[str]:
        if isinstance(module, CBAM) and module.spatial is not None:
            if module.spatial.bn.momentum != 0.01:
                return [
                    "the official spatial-gate BN momentum is 0.01 (attention_kwargs "
                    "bn_momentum=0.01); it only matters when training"
                ]
        return []


BAM_NAMES = {
    "channel_mlp.0.": "channel_att.gate_c.gate_c_fc_0.",
    "channel_mlp.1.": "channel_att.gate_c.gate_c_bn_1.",
    "channel_mlp.3.": "channel_att.gate_c.gate_c_fc_final.",
    "spatial.0.": "spatial_att.gate_s.gate_s_conv_reduce0.",
    "spatial.1.": "spatial_att.gate_s.gate_s_bn_reduce0.",
    "spatial.3.": "spatial_att.gate_s.gate_s_conv_di_0.",
    "spatial.4.": "spatial_att.gate_s.gate_s_bn_di_0.",
    "spatial.6.": "spatial_att.gate_s.gate_s_conv_di_1.",
    "spatial.7.": "spatial_att.gate_s.gate_s_bn_di_1.",
    "spatial.9.": "spatial_att.gate_s.gate_s_conv_final.",
}


class JongchanBAM(AttentionMapping):
    name = "bam"
    placement = "stage"
    label = "BAM after layer1, layer2 and layer3 (bam1..bam3)"
    marker = re.compile(r"^bam[123]\.")

    def official_prefix(self, ours: str) -> str:
        # "stage_attention.0." -> "bam1."
        return f"bam{int(ours.split('.')[1]) + 1}."

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        for mine, official in BAM_NAMES.items():
            if rest.startswith(mine):
                return official + rest[len(mine) :], None
        return None  # output_bn=True's channel_bn / spatial.10: not in the official code

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        kwargs: dict = {"combine": "product"}
        fc = state.get("bam1.channel_att.gate_c.gate_c_fc_0.weight")
        if fc is not None and fc.dim() == 2:
            hidden, channels = fc.shape
            if hidden != max(1, channels // 16) and channels % hidden == 0:
                kwargs["reduction"] = channels // hidden
        return Expected(backbone, "bam", kwargs, label=self.label)

    def check_module(self, module: nn.Module, where: str) -> list[str]:
        if not isinstance(module, BAM):
            return []
        problems = []
        if module.combine != "product":
            problems.append(
                "the official BAM computes F * (1 + sigmoid(M_c * M_s)); the model's BAM has "
                f"combine={module.combine!r} (sigmoid(M_c + M_s), the paper's Eq. 2): build it "
                "with attention_kwargs={'combine': 'product'}"
            )
        dilated = [
            m for m in module.spatial if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        ]
        if any(m.dilation != (4, 4) for m in dilated):
            problems.append(
                f"the official BAM's 3x3 convs have dilation 4; the model's have "
                f"{dilated[0].dilation[0]}: build it with dilation=4 (the default)"
            )
        return problems


register_source(
    Source(
        "jongchan",
        "official CBAM and BAM ResNets (Woo et al. ECCV 2018, Park et al. BMVC 2018)",
        "https://github.com/Jongchan/attention-module",
        (JongchanCBAM(), JongchanBAM()),
        (
            (
                "ResNet50+CBAM, 100 epochs (77.622 top-1)",
                "https://drive.google.com/file/d/1mvAVvhLR_2XY_bPYxh-SEz4vDmGzSArO/view?usp=sharing",
            ),
            (
                "ResNet50+BAM, 90 epochs (76.860 top-1)",
                "https://drive.google.com/file/d/1auVf70gfL0ol40bvaX5rlbpn9cKIxhAL/view?usp=sharing",
            ),
        ),
    )
)
