"""eSE: effective Squeeze-Excitation (Lee, Park, "CenterMask: Real-Time Anchor-Free Instance
Segmentation", CVPR 2020, arXiv:1911.06667; the attention of VoVNetV2's OSA modules; official
code youngwanLEE/CenterMask and youngwanLEE/vovnet-detectron2, class ``eSEModule``).

SE with one fully connected layer and no reduction. For X (N, C, H, W):

    F_gap(X)_c = 1/(H W) sum_{i,j} X_c(i, j)          global average pooling   (N, C, 1, 1)
    A_eSE      = sigma(W_C F_gap(X) + b)               one C -> C FC (a 1x1 conv), with bias
    Y          = A_eSE * X                             channel-wise rescaling

The CenterMask paper's argument: SE's C -> C/r -> C bottleneck loses channel information, so
eSE keeps C channels in a single FC; sigma is a hard sigmoid.

Choices:
- ``gate="hard_sigmoid"`` (default): sigma(z) = ReLU6(z + 3) / 6, the ``Hsigmoid`` of the
  official code. This is exactly PyTorch's ``F.hardsigmoid`` (0 below -3, 1 above 3, z/6 + 1/2
  between); it is not Keras's older hard sigmoid clip(0.2 z + 0.5, 0, 1), which has another
  slope. ``gate="sigmoid"`` gives the logistic sigmoid, as PaddleClas's PP-HGNet ``ESEModule``
  uses.
- The FC has a bias (``nn.Conv2d(C, C, 1)`` in the official code): C^2 + C parameters.
- The hard sigmoid has zero slope outside (-3, 3): a channel whose logit sits there passes
  no gradient to W_C and b (the price of the cheaper gate).
- Placement: in every residual block (VoVNetV2 puts eSE at the end of each OSA module,
  before the identity addition).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input

GATES = ("hard_sigmoid", "sigmoid")


@register_attention("ese")
class EffectiveSqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: str = "hard_sigmoid") -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.channels = channels
        self.gate_name = gate
        self.fc = nn.Conv2d(channels, channels, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """A_eSE, shape (N, C, 1, 1)."""
        logits = self.fc(x.mean(dim=(2, 3), keepdim=True))
        return F.hardsigmoid(logits) if self.gate_name == "hard_sigmoid" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "ese")
        return x * self.gate(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, gate={self.gate_name!r}"
