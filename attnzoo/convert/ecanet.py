"""Source "ecanet": BangguWu/ECANet, the official ECA-Net code (``models/eca_resnet.py``,
``models/eca_module.py``).

``eca_resnet18/34/50/101/152(k_size=[k1, k2, k3, k4])`` is a torchvision-layout ResNet with
``eca_layer`` in every block, after the last BN and before the addition, as ``layerX.Y.eca``:
one ``conv`` (Conv1d(1, 1, k), no bias), key ``layerX.Y.eca.conv.weight`` of shape (1, 1, k),
the same as our ``layerX.Y.attention.conv.weight``. Stage i uses k = k_i.

The code's default is k = 3 in every stage (``attention_kwargs={"kernel_size": 3}``), but
the released ImageNet checkpoints were trained with ``--ksize`` per stage, as their names
say: eca_resnet18_k3577, eca_resnet34_k3357, eca_resnet50_k3557, eca_resnet101_k3357 and
eca_resnet152_k3357 (k = 3, 5, 5, 7 in layer1..layer4 of ResNet-50; the 80 ECA parameters
the README gives for ResNet-50 are 3*3 + 5*4 + 5*6 + 7*3). Neither the code's k = 3 nor the
paper's adaptive k (5, 5, 5, 7 for ResNet-50) gives these, and ``create_model`` builds every
ECA module with one rule, so ``set_eca_kernel_sizes(model, (3, 5, 5, 7))`` rebuilds each
stage's modules with its k before loading. ``load_official`` reads the kernel sizes off the
checkpoint and its error says which call a model needs. There is no ResNet-152 in attnzoo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..attention.eca import EfficientChannelAttention
from ..attention.layers import eca_kernel_size
from ..models.resnet import ResNet
from .core import AttentionMapping, Backbone, Expected, Source, Transform, register_source


def set_eca_kernel_sizes(model: nn.Module, kernel_sizes: Sequence[int]) -> nn.Module:
    """Rebuild the ECA module of every block of stage i with kernel size ``kernel_sizes[i]``
    (freshly initialised), for checkpoints trained with a k per stage (ECANet's released
    ResNets). The model must have ECA in every block. Returns the model."""
    if not isinstance(model, ResNet):
        raise ValueError(
            f"set_eca_kernel_sizes takes an attnzoo ResNet, got {type(model).__name__}"
        )
    stages = model.stages()
    kernel_sizes = tuple(int(k) for k in kernel_sizes)
    if len(kernel_sizes) != len(stages):
        raise ValueError(
            f"{model.name} has {len(stages)} stages; got {len(kernel_sizes)} kernel sizes"
        )
    for stage, k in zip(stages, kernel_sizes, strict=True):
        for block in stage:
            old = block.attention
            if not isinstance(old, EfficientChannelAttention):
                raise ValueError(
                    "set_eca_kernel_sizes needs ECA in every block: build the model with "
                    "attention='eca'"
                )
            weight = old.conv.weight
            new = EfficientChannelAttention(old.channels, kernel_size=k)
            block.attention = new.to(device=weight.device, dtype=weight.dtype)
    return model


def stage_kernel_sizes(
    state: Mapping[str, torch.Tensor], name: str, backbone: Backbone
) -> tuple[int, ...] | None:
    """The 1-D kernel size of each stage's ECA convs (``layerX.Y.<name>.conv.weight``), or
    None where a stage mixes sizes."""
    sizes = []
    for i in range(1, len(backbone.layers) + 1):
        pattern = re.compile(rf"^layer{i}\.\d+\.{name}\.conv\.weight$")
        found = {int(v.shape[-1]) for k, v in state.items() if pattern.match(k)}
        if len(found) != 1:
            return None
        sizes.append(found.pop())
    return tuple(sizes)


def eca_expected(
    state: Mapping[str, torch.Tensor], backbone: Backbone, name: str, label: str
) -> Expected:
    sizes = stage_kernel_sizes(state, name, backbone)
    if sizes is None:
        return Expected(backbone, "eca", label=label + " (kernel sizes vary within a stage)")
    label = f"{label} (k = {', '.join(map(str, sizes))} in layer1..layer{len(sizes)})"
    adaptive = tuple(eca_kernel_size(c) for c in backbone.stage_channels)
    if sizes == adaptive:
        return Expected(backbone, "eca", label=label)
    if len(set(sizes)) == 1:
        return Expected(backbone, "eca", {"kernel_size": sizes[0]}, label=label)
    return Expected(
        backbone,
        "eca",
        label=label,
        extra_step=f"attnzoo.convert.set_eca_kernel_sizes(model, {sizes})",
        extra=lambda model: set_eca_kernel_sizes(model, sizes),
    )


class ECANetECA(AttentionMapping):
    name = "eca"
    label = "ECA in every block"
    marker = re.compile(r"^layer\d\.\d+\.eca\.conv\.weight$")

    def official_prefix(self, ours: str) -> str:
        return ours[: -len("attention.")] + "eca."

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        return (rest, None) if rest == "conv.weight" else None

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        return eca_expected(state, backbone, "eca", self.label)


_GD = "https://drive.google.com/open?id="
register_source(
    Source(
        "ecanet",
        "official ECA-Net ResNets (Wang et al. CVPR 2020)",
        "https://github.com/BangguWu/ECANet",
        (ECANetECA(),),
        (
            ("eca_resnet18_k3577 (70.92 top-1)", _GD + "1LMRFRTyzVifGBi2MUpTuYEWW44S8mwyl"),
            ("eca_resnet34_k3357 (74.21 top-1)", _GD + "15LV5Jkea3GPzvLP5__H7Gg88oNQUxBDE"),
            ("eca_resnet50_k3557 (77.42 top-1)", _GD + "1670rce333c_lyMWFzBlNZoVUvtxbCF_U"),
            ("eca_resnet101_k3357 (78.65 top-1)", _GD + "1b5FQ8yDFnZ_UhvWT9txmjI_LjbKkgnvC"),
        ),
    )
)
