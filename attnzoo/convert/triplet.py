"""Source "triplet": landskape-ai/triplet-attention, the official triplet-attention code
(``MODELS/resnet.py``, ``MODELS/triplet_attention.py``; also the newer root
``triplet_attention.py``).

``ResidualNet("ImageNet", depth, 1000, "TripletAttention")`` is a torchvision-layout ResNet
with ``TripletAttention`` in every block, after the last BN and before the addition, as
``layerX.Y.triplet_attention``. It has three gates, each a BasicConv(2, 1, k) (conv without
bias, BN with momentum 0.01) on a Z-pool [max; mean] of its input:

- ``ChannelGateH`` on ``x.permute(0, 2, 1, 3)``: pools H, a (C, W) map: our ``channel_width``;
- ``ChannelGateW`` on ``x.permute(0, 3, 2, 1)``: pools W, an (H, C) map: our ``channel_height``;
- ``SpatialGate`` on x: pools C, an (H, W) map: our ``height_width``,

each with keys ``.spatial.conv.weight`` and ``.spatial.bn.*``. The root module names them
``cw``, ``hc`` and ``hw`` with keys ``.conv.conv.weight`` / ``.conv.bn.*``; both namings load.
The map orientations are ours too, and so is the [max; mean] order (our default
``pool_order="max_mean"``; a ``"mean_max"`` model gets the two input channels swapped).

The README's checkpoints were trained with k = 7 and k = 3 (ResNet-18 and -50, one each):
build k = 3 with ``attention_kwargs={"kernel_size": 3}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .core import (
    AttentionMapping,
    Backbone,
    Expected,
    Source,
    Transform,
    register_source,
    swap_pair,
)

OURS = ("channel_width", "channel_height", "height_width")


class TripletMapping(AttentionMapping):
    name = "triplet"
    label = "triplet attention in every block"
    gates: tuple[str, str, str] = ("", "", "")  # official names in the order of OURS
    inner = ""  # official BasicConv attribute: "spatial" or "conv"

    def official_prefix(self, ours: str) -> str:
        return ours[: -len("attention.")] + "triplet_attention."

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        gate, _, tail = rest.partition(".")
        if gate not in OURS:
            return None
        official = f"{self.gates[OURS.index(gate)]}.{self.inner}.{tail}"
        if tail == "conv.weight":
            ours_first = getattr(getattr(module, gate), "pool_order", "max_mean") == "mean_max"
            return official, swap_pair if ours_first else None
        return official, None

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        kwargs: dict = {}
        prefix = "layer1.0.triplet_attention."
        conv = state.get(f"{prefix}{self.gates[0]}.{self.inner}.conv.weight")
        if conv is not None and conv.shape[-1] != 7:
            kwargs["kernel_size"] = int(conv.shape[-1])
        if not any(k.startswith(f"{prefix}{self.gates[2]}.") for k in state):
            kwargs["no_spatial"] = True
        return Expected(backbone, "triplet", kwargs, {"bn_momentum": 0.01}, label=self.label)

    def notes(self, module: nn.Module) -> list[str]:
        if getattr(getattr(module, "channel_width", None), "bn", None) is not None:
            if module.channel_width.bn.momentum != 0.01:
                return [
                    "the official gates' BN momentum is 0.01 (attention_kwargs "
                    "bn_momentum=0.01); it only matters when training"
                ]
        return []


class TripletModels(TripletMapping):
    """``MODELS/triplet_attention.py`` (what the ImageNet checkpoints were trained with)."""

    marker = re.compile(r"^layer\d\.\d+\.triplet_attention\.(ChannelGate[HW]|SpatialGate)\.")
    gates = ("ChannelGateH", "ChannelGateW", "SpatialGate")
    inner = "spatial"


class TripletRoot(TripletMapping):
    """The root ``triplet_attention.py`` (``cw``, ``hc``, ``hw``)."""

    marker = re.compile(r"^layer\d\.\d+\.triplet_attention\.(cw|hc|hw)\.")
    gates = ("cw", "hc", "hw")
    inner = "conv"


_GD = "https://drive.google.com/"
register_source(
    Source(
        "triplet",
        "official triplet-attention ResNets (Misra et al. WACV 2021)",
        "https://github.com/landskape-ai/triplet-attention",
        (TripletModels(), TripletRoot()),
        (
            (
                "ResNet-18 + Triplet Attention (k = 3)",
                _GD + "file/d/1p3_s2kA5NFWqCtp4zvZdc91_2kEQhbGD/view?usp=sharing",
            ),
            (
                "ResNet-18 + Triplet Attention (k = 7)",
                _GD + "file/d/1jIDfA0Psce10L06hU0Rtz8t7s2U1oqLH/view?usp=sharing",
            ),
            (
                "ResNet-50 + Triplet Attention (k = 7)",
                _GD + "open?id=1ptKswHzVmULGbE3DuX6vMCjEbqwUvGiG",
            ),
            (
                "ResNet-50 + Triplet Attention (k = 3)",
                _GD + "open?id=1W6aDE6wVNY9NwgcM7WMx_vRhG2-ZiMur",
            ),
        ),
    )
)
