"""SRM: Style-based Recalibration Module (Lee, Kim, Nam, "SRM: A Style-based Recalibration
Module for Convolutional Neural Networks", ICCV 2019, arXiv:1903.10829; official code
hyunjaelee410/style-based-recalibration-module, ``models/recalibration_modules.py``).

A channel gate computed from each channel's *style*, its mean and standard deviation. For
X (N, C, H, W), sample n, channel c, over its M = H W positions:

    mu_nc    = 1/M sum_{h,w} x_nc(h, w)                       style pooling
    sigma_nc = sqrt(sum_{h,w} (x_nc(h, w) - mu_nc)^2 / (M - 1))
    t_nc     = [mu_nc, sigma_nc]                              the style vector, (N, C, 2)
    z_nc     = w_c . t_nc = w_c1 mu_nc + w_c2 sigma_nc         style integration: a channel-
                                                               wise fully connected layer (CFC)
    z^_nc    = BN(z)_nc                                        batch norm over the batch, per c
    g_nc     = sigmoid(z^_nc),      y_nc = g_nc x_nc

Parameters: the CFC weights w (C x 2, no bias: the BN's shift plays that part) and BN's
scale and shift, 4 C in all.

Choices, with the official code:
- sigma uses the unbiased variance (divisor M - 1, ``torch.std``'s default in the code) with
  no epsilon. On a 1 x 1 map (M = 1) the code divides by zero and returns NaN; we take the
  divisor max(M - 1, 1), so sigma = 0 there. Where the spread is exactly zero the square root
  is formed so that its gradient stays finite (value unchanged: sigma = 0).
- The CFC weights start at zero (official code): at initialisation every z is 0 and, in
  training mode, every gate is sigmoid(BN shift) = 1/2; the gradient still reaches w.
- The BN is an ``nn.BatchNorm1d`` over z (N, C), the same statistics as the code's
  ``BatchNorm2d`` over (N, C, 1, 1). A training batch of one sample uses the running
  statistics instead of failing (``SingleSampleSafeBatchNorm1d``).
- mu and sigma are computed in at least float32: under bf16 autocast the input often arrives
  in bf16, whose 8-bit mantissa would spoil a variance. The output keeps the input's dtype.
- Placement: in every residual block, after the last BN of the residual branch, before the
  addition (official ResNets), where SE goes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import SingleSampleSafeBatchNorm1d, check_input, safe_sqrt


def style_pooling(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma), each (N, C), in at least float32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    positions = x.shape[2] * x.shape[3]
    mean = x.mean(dim=(2, 3))
    variance = (x - mean[:, :, None, None]).square().sum(dim=(2, 3)) / max(positions - 1, 1)
    return mean, safe_sqrt(variance)


@register_attention("srm")
class StyleRecalibration(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        # Column 0 weighs the channel mean, column 1 its standard deviation.
        self.style_weight = nn.Parameter(torch.zeros(channels, 2))
        self.bn = SingleSampleSafeBatchNorm1d(channels)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """g, shape (N, C, 1, 1), in the BN's dtype."""
        mean, std = style_pooling(x)
        weight = self.style_weight.to(mean.dtype)
        z = weight[:, 0] * mean + weight[:, 1] * std  # (N, C)
        return torch.sigmoid(self.bn(z.to(self.bn.weight.dtype)))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "srm")
        return x * self.gate(x).to(x.dtype)
