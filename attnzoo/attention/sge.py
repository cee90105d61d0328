"""SGE: Spatial Group-wise Enhance (Li, Hu, Yang, "Spatial Group-wise Enhance: Improving
Semantic Feature Learning in Convolutional Networks", arXiv:1905.09646, 2019; official code
implus/PytorchInsight, ``classification/models/imagenet/resnet_sge.py``).

The C channels are split into G groups of C/G consecutive channels. In one group, at each of
its m = H W positions i there is a C/G-dimensional feature vector x_i, and the paper's
steps are

    g     = 1/m sum_i x_i                      the group's global descriptor (average pooling)
    c_i   = g . x_i                            similarity of each position to it (dot product)
    c^_i  = (c_i - mu_c) / (sigma_c + eps)     normalised over the group's m positions
    a_i   = gamma c^_i + beta                  one (gamma, beta) pair per group
    x^_i  = x_i * sigmoid(a_i)                 every channel of the group at position i

Choices:
- ``groups`` G = 64 by default (the official ResNets' value). When C is not a
  multiple of G we use the largest divisor of C that is at most G (C = 16 -> 16 groups of one
  channel; C = 300 -> 60 groups), so the module fits any width; ``self.groups`` holds the
  number used. A ResNet-50 (C = 256 ... 2048) gets exactly 64.
- sigma_c is the unbiased standard deviation over the m positions (divisor m - 1), with
  eps = 1e-5 added to sigma_c (not to the variance), as the official code computes it
  (``t.std(dim=1) + 1e-5``). On a 1 x 1 map (m = 1) the official code divides by zero and
  returns NaN; we take the divisor max(m - 1, 1), so c^ = 0 and the gate is sigmoid(beta).
  Where the spread is exactly zero (a constant c) sigma_c's square root is formed so that its
  gradient stays finite (the value is unchanged).
- gamma starts at 0 and beta at 1 (official code): at initialisation every gate is
  sigmoid(1), and the gradient still reaches gamma (through c^) and beta.
- The statistics (g, c, mu_c, sigma_c) are computed in at least float32: under bf16 autocast
  the input often arrives in bf16, whose 8-bit mantissa would spoil the normalisation.
- Placement: in every residual block, after the last BN of the residual branch (official
  code), where SE goes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, largest_divisor_at_most, safe_sqrt

EPSILON = 1e-5


@register_attention("sge")
class SpatialGroupEnhance(nn.Module):
    def __init__(self, channels: int, groups: int = 64) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        self.channels = channels
        self.groups = largest_divisor_at_most(channels, groups)
        self.gamma = nn.Parameter(torch.zeros(self.groups))
        self.beta = nn.Parameter(torch.ones(self.groups))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(a), shape (N, G, 1, H, W), in at least float32."""
        n, c, h, w = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        grouped = x.reshape(n, self.groups, c // self.groups, h, w).to(dtype)
        descriptor = grouped.mean(dim=(3, 4), keepdim=True)  # g
        similarity = (grouped * descriptor).sum(dim=2, keepdim=True)  # c_i, (N, G, 1, H, W)
        centred = similarity - similarity.mean(dim=(3, 4), keepdim=True)
        variance = centred.square().sum(dim=(3, 4), keepdim=True) / max(h * w - 1, 1)
        normalised = centred / (safe_sqrt(variance) + EPSILON)
        gamma = self.gamma.to(dtype).view(1, -1, 1, 1, 1)
        beta = self.beta.to(dtype).view(1, -1, 1, 1, 1)
        return torch.sigmoid(gamma * normalised + beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "sge")
        n, c, h, w = x.shape
        grouped = x.reshape(n, self.groups, c // self.groups, h, w)
        return (grouped * self.gate(x).to(x.dtype)).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
