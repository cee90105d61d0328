"""Source "timm": timm's ``ResNet`` class where its structure is ours.

timm's plain ResNets (``resnet18/34/50/101``, ``resnext50_32x4d``, any pretrained tag) have
torchvision's layout and key names. Its SE ResNets (``seresnet18/34/50/101``,
``seresnext50_32x4d``) add ``layerX.Y.se`` after the last BN, before the addition: an
``SEModule`` with ``fc1`` / ``fc2`` 1x1 convs with biases (keys ``se.fc1.*``, ``se.fc2.*``,
the same as our ``attention.fc1`` / ``attention.fc2``) and ``C / 16`` hidden channels rounded
to a multiple of 8 (at least 8): our ``rd_rule="floor"`` for C >= 128 (ResNet-50), our
``rd_rule="round8"`` on the 64-channel stage of ResNet-18/34. A timm ResNet built with
``block_args=dict(attn_layer="eca")`` has ``se.conv.weight`` (ECA, adaptive k with the same
rule as ours).

Refused, because no attnzoo model computes the same function:
- the "d" / "t" / "s" variants (``resnet50d``, ``ecaresnet50d``, ``ecaresnet50t``,
  ``ecaresnet26t``, ``seresnet50t``, ...): a deep 3-conv stem (``conv1.0``, ``conv1.1``, ...)
  and, for "d", avg-pool shortcuts;
- ``ecaresnetlight`` and other avg-down nets (``downsample.1`` a conv, ``downsample.2`` a BN);
- the ``ByobNet`` family (``gcresnet50t``, ``eca_resnet33ts``, ``seresnet33ts``,
  ``gcresnet33ts``): ``stem.*`` / ``stages.*`` layout, tiered stem;
- ``legacy_seresnet*`` (Cadene's port of Hu et al.'s Caffe weights): a stem max-pool with
  ``ceil_mode=True`` and no padding, which picks other windows than ours;
- selective-kernel (``skresnet*``) and other attention layers we do not map.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..attention.layers import reduced_channels
from .core import AttentionMapping, Backbone, Expected, Source, Transform, register_source
from .ecanet import eca_expected


class TimmSE(AttentionMapping):
    name = "se"
    label = "SE in every block"
    marker = re.compile(r"^layer\d\.\d+\.se\.fc1\.weight$")

    def official_prefix(self, ours: str) -> str:
        return ours[: -len("attention.")] + "se."

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        return (rest, None) if rest.split(".")[0] in ("fc1", "fc2") else None

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        pairs = [
            (int(v.shape[1]), int(v.shape[0]))
            for k, v in state.items()
            if self.marker.match(k) and v.dim() == 4
        ]
        kwargs: dict = {}
        for rule in ("floor", "round8"):
            if all(reduced_channels(c, 16, rule) == h for c, h in pairs):
                if rule != "floor":
                    kwargs["rd_rule"] = rule
                break
        return Expected(backbone, "se", kwargs, label=self.label)


class TimmECA(AttentionMapping):
    name = "eca"
    label = "ECA in every block"
    marker = re.compile(r"^layer\d\.\d+\.se\.conv\.weight$")

    def official_prefix(self, ours: str) -> str:
        return ours[: -len("attention.")] + "se."

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        return (rest, None) if rest == "conv.weight" else None

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        return eca_expected(state, backbone, "se", self.label)


class TimmSource(Source):
    def refuse_layout(self, state: Mapping[str, torch.Tensor]) -> str | None:
        keys = list(state)
        none = "; no attnzoo model matches it"
        if any(k.startswith(("stem.", "stages.")) for k in keys):
            return (
                "a timm ByobNet-family checkpoint (stem.* / stages.* keys: gcresnet50t, "
                "gcresnet33ts, eca_resnet33ts, seresnet33ts, ...) with a tiered stem and "
                "another block layout" + none
            )
        if "layer0.conv1.weight" in state or "last_linear.weight" in state:
            return (
                "a timm legacy SENet checkpoint (legacy_seresnet*, layer0.* / last_linear.* "
                "keys): its stem max-pool uses ceil_mode=True without padding, which pools "
                "other windows than the attnzoo ResNet stem" + none
            )
        if "conv1.0.weight" in state:
            return (
                "a timm deep-stem checkpoint (conv1.0 / conv1.1 / ... keys: the 'd', 't' and "
                "'s' variants such as resnet50d, ecaresnet50d, ecaresnet50t, ecaresnet26t, "
                "seresnet50t): attnzoo ResNets have the single 7x7 stem conv" + none
            )
        if any(re.search(r"\.downsample\.2\.", k) for k in keys):
            return (
                "a timm avg-down checkpoint (layerX.0.downsample.1 is a conv after an "
                "AvgPool, downsample.2 its BN: ecaresnetlight, the 'd' variants): attnzoo "
                "ResNets have the strided 1x1 conv + BN shortcut" + none
            )
        odd = next((k for k in keys if re.search(r"\.(paths|se\.bn|se\.conv2)\.", k)), None)
        if odd is not None:
            return (
                f"a timm block attention attnzoo does not map (key {odd!r}: selective kernel "
                "or an SE/ECA variant with a BN or MLP)" + none
            )
        return None


register_source(
    TimmSource(
        "timm",
        "timm ResNets with the plain stem: resnet18/34/50/101, resnext50_32x4d, "
        "seresnet18/34/50/101, seresnext50_32x4d",
        "https://github.com/huggingface/pytorch-image-models",
        (TimmSE(), TimmECA()),
        (
            (
                "any pretrained tag of the models above, e.g. seresnet50.a1_in1k",
                "https://huggingface.co/timm/seresnet50.a1_in1k",
            ),
        ),
    )
)
