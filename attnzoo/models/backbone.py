"""The shape every backbone shares, and where an attention module goes in it.

A backbone is a stem, a list of stages (each a sequence of blocks) and a head (global
average pooling and a classifier). Subclasses provide the stem (``_stem``), the names of
their stage attributes (``stage_names``, e.g. ``("layer1", ..., "layer4")`` as torchvision
has them), ``stage_channels``, ``get_classifier()`` and, for ABN, ``make_stage``.

Placement of a module-level attention (``placement=``; by default where the attention's
paper puts it, ``registry.default_placement``: every block, except BAM at the stage
boundaries):

- ``"block"``: one module in every block, where the block's own code puts it
  (ResNets: after the last BN, before the addition with the shortcut).
- ``"stage"``: one module at each stage boundary, i.e. after every stage but the last,
  where the network downsamples next (BAM's placement; ResNet-50 gets three, a CIFAR
  ResNet two).
- ``"final"``: one module on the last feature map, before pooling (the single-module
  variant of the attention-based CNN paper).

Block-level attentions (bridge) only go in blocks; conv-level ones (sk) replace each block's
3x3 conv, in the backbones with ``takes_conv_attention`` (the ResNets). Model-level attentions (abn,
bridge_head) are not placed by the backbone at all: ``create_model`` wraps the plain
backbone, which is why they rely on the methods below and on nothing model-specific.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import attention_level, default_placement
from .common import (
    AttentionFactory,
    attention_factory,
    check_model_input,
    conv_factory,
    no_attention,
)

PLACEMENTS = ("block", "stage", "final")


class Backbone(nn.Module):
    stage_names: tuple[str, ...] = ()
    takes_conv_attention = False  # whether its blocks can swap their 3x3 conv (sk)

    def __init__(self, name: str, in_chans: int, num_classes: int) -> None:
        super().__init__()
        if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
        self.name = name
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stage_channels: list[int] = []
        self.stage_attention: nn.ModuleList | None = None
        self.final_attention: nn.Module | None = None
        self._placed: tuple[str | None, dict, str] = (None, {}, "block")
        self.make_conv = None  # the conv-level attention's builder, when there is one

    # --- attention placement -------------------------------------------------------------

    def block_attention(
        self, attention: str | None, attention_kwargs: dict | None, placement: str | None = None
    ) -> AttentionFactory:
        """Check ``placement`` and return the factory the blocks build their module with
        (``nn.Identity`` unless the placement is ``"block"``). Call ``place_attention()``
        once the stages exist. ``placement=None``: where the attention's paper puts it
        (``registry.default_placement``: every block for most, stage boundaries for BAM)."""
        if placement is None:
            placement = default_placement(attention)
        if placement not in PLACEMENTS:
            raise ValueError(
                f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}"
            )
        if attention is not None and placement != "block" and attention_level(attention) == "block":
            raise ValueError(
                f"attention {attention!r} reads a block's intermediate outputs, so it only goes "
                f"in blocks: use placement='block', not {placement!r}"
            )
        if attention is not None and attention_level(attention) == "conv":
            if not self.takes_conv_attention:
                raise ValueError(
                    f"attention {attention!r} replaces a block's 3x3 convolution, which "
                    f"{self.name} does not support; use a ResNet (resnet18 ... resnet101, "
                    f"resnext50_32x4d, or the CIFAR resnet20 ... resnet110)"
                )
            if placement != "block":
                raise ValueError(
                    f"attention {attention!r} replaces a block's 3x3 convolution, so it only "
                    f"goes in blocks: use placement='block', not {placement!r}"
                )
        self._placed = (attention, dict(attention_kwargs or {}), placement)
        self.make_conv = conv_factory(attention, attention_kwargs)
        if placement != "block" or self.make_conv is not None:
            return no_attention
        return attention_factory(attention, attention_kwargs)

    def place_attention(self) -> None:
        """Build the stage or final modules for a ``"stage"``/``"final"`` placement."""
        attention, kwargs, placement = self._placed
        if attention is None or placement == "block":
            return
        make = attention_factory(attention, kwargs)
        if placement == "stage":
            if len(self.stage_channels) < 2:
                raise ValueError(f"{self.name} has one stage: no stage boundary to place at")
            self.stage_attention = nn.ModuleList(make(c) for c in self.stage_channels[:-1])
        else:
            self.final_attention = make(self.stage_channels[-1])

    def init_weights(self, root: nn.Module | None = None, linear_std: float | None = None) -> None:
        """He (fan-out) init for convs, BN to identity, zero biases, and linear weights from
        N(0, linear_std) when given (else PyTorch's default). Attention modules keep their
        own initialisation (a zero-initialised gate must stay zero)."""
        for name, m in (root or self).named_modules():
            if any(part.endswith("attention") for part in name.split(".")):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if linear_std is not None:
                    nn.init.normal_(m.weight, 0.0, linear_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- forward pieces ------------------------------------------------------------------

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(x, self.in_chans, self.name)
        return self._stem(x)

    def stages(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index``, followed by its stage-boundary attention if there is one."""
        x = getattr(self, self.stage_names[index])(x)
        if self.stage_attention is not None and index < len(self.stage_attention):
            x = self.stage_attention[index](x)
        if index == len(self.stage_names) - 1:
            x = self._after_stages(x)
            if self.final_attention is not None:
                x = self.final_attention(x)
        return x

    def _after_stages(self, x: torch.Tensor) -> torch.Tensor:
        """What follows the last stage before pooling (pre-activation nets: BN-ReLU)."""
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for i in range(len(self.stage_names)):
            x = self.forward_stage(i, x)
        return x

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _make_stage(self, index: int, stride: int, make_attention: AttentionFactory) -> nn.Module:
        raise NotImplementedError(f"{self.name} cannot build a copy of one of its stages")

    def make_stage(self, index: int, stride: int) -> nn.Module:
        """A fresh stage built like stage ``index`` but with the given first stride and no
        attention, initialised like the backbone (ABN's attention branch copies the last
        stage at stride 1). Subclasses provide ``_make_stage(index, stride, factory)``."""
        stage = self._make_stage(index, stride, no_attention)
        self.init_weights(stage)
        return stage
