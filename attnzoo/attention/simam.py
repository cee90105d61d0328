"""SimAM: a simple, parameter-free attention module (Yang, Zhang, Li, Xie, "SimAM: A Simple,
Parameter-Free Attention Module for Convolutional Neural Networks", ICML 2021, PMLR 139,
as cited by the official repository ZjjConan/SimAM).

Every activation t of a channel gets an energy; the lower it is, the more t stands out from
the other activations of its channel. With mu and sigma^2 the channel's mean and variance
over its M = H W positions, the minimal energy (the paper's Eq. 5, lambda its coefficient)
and the refinement (Eq. 6) are

    e*_t = 4 (sigma^2 + lambda) / ((t - mu)^2 + 2 sigma^2 + 2 lambda)
    out  = sigmoid(1 / E) * X,       E: every e*_t, shape (N, C, H, W)

and 1 / e*_t = (t - mu)^2 / (4 (sigma^2 + lambda)) + 1/2, the form computed here (and in the
official code). No parameters: a 3-D (per activation) gate from the feature map alone.

Choices, as in the official implementation (its README listing and ``simam_module.py``):
- sigma^2 = sum_i (t_i - mu)^2 / (M - 1), the unbiased estimate, M = H W.
- ``e_lambda`` = 1e-4 by default, the module's default and the value of the authors' CIFAR
  checkpoints; their ImageNet training commands pass 0.1 (``--attention_param 0.1``).
- A 1 x 1 map has no spread (M - 1 = 0, where the official code divides by zero and returns
  NaN): we take sigma^2 = 0 there, so every gate is sigmoid(1/2).
- The statistics are computed in float32 whatever the input's dtype (under bf16 autocast a
  bf16 variance would lose most of its digits); the output keeps the input's dtype.
- Placement: in every residual block, where SE and CBAM go (the paper's ResNets do so).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input


def simam_gate(x: torch.Tensor, e_lambda: float) -> torch.Tensor:
    """sigmoid(1 / E): the per-activation gate, float32, shape of ``x``."""
    x32 = x.float()
    positions = x.shape[2] * x.shape[3]
    d = (x32 - x32.mean(dim=(2, 3), keepdim=True)).square()
    variance = d.sum(dim=(2, 3), keepdim=True) / max(positions - 1, 1)
    return torch.sigmoid(d / (4 * (variance + e_lambda)) + 0.5)


@register_attention("simam")
class SimAM(nn.Module):
    def __init__(self, channels: int, e_lambda: float = 1e-4) -> None:
        super().__init__()
        if (
            not isinstance(e_lambda, (int, float))
            or isinstance(e_lambda, bool)
            or not e_lambda > 0
            or e_lambda == float("inf")
        ):
            raise ValueError(f"e_lambda must be a finite number > 0, got {e_lambda!r}")
        self.channels = channels
        self.e_lambda = float(e_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "simam")
        return x * simam_gate(x, self.e_lambda).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, e_lambda={self.e_lambda:g}"
