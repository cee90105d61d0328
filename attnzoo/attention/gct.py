"""GCT: Gated Channel Transformation (Yang, Zhu, Wu, Yang, "Gated Channel Transformation for
Visual Recognition", CVPR 2020, arXiv:1909.11519; official code z-x-yang/GCT, ``GCT.py`` in
PyTorch and ``convnet_builder.py`` in TensorFlow).

Three trainable vectors per module, each of length C: the embedding weight alpha, the gating
weight gamma and the gating bias beta. For X (N, C, H, W) and each sample:

    s_c  = alpha_c ||x_c||_2 = alpha_c sqrt(sum_{h,w} x_c(h, w)^2 + eps)     (Eq. 1)
    s^_c = sqrt(C) s_c / ||s||_2 = sqrt(C) s_c / sqrt(sum_c s_c^2 + eps)     (Eq. 2)
    y_c  = x_c (1 + tanh(gamma_c s^_c + beta_c))                             (Eq. 3)

Eq. 1 embeds each channel's global context, Eq. 2 makes the channels compete (a channel
normalisation, no parameters), Eq. 3 gates each channel; the "1 +" keeps an identity path.

Choices:
- alpha = 1, gamma = 0, beta = 0 at initialisation (paper and official code): every gate is
  then 1 + tanh(0) = 1, so the module starts as the identity. At that point alpha gets no
  gradient (it only acts through gamma s^); gamma and beta do, and alpha follows once
  gamma moves.
- eps = 1e-5 (``epsilon``), placed as in Eqs. 1 and 2 above. The official code adds eps to
  the *mean* of s_c^2 over channels, sqrt(mean_c s_c^2 + eps), i.e. C eps to the sum of
  Eq. 2; the two differ only where sum_c s_c^2 is of the order of eps.
- ``mode="l1"`` is the official code's other option: s_c = alpha_c sum_{h,w} |x_c(h, w)|
  and s^_c = C s_c / (sum_c |s_c| + eps) (the code again adds eps to the mean, not the sum).
  The paper's Eqs. 1-3 are the l2 form (the default); whether its text also states this l1
  form could not be checked here, so it follows the code. The code's ``after_relu`` flag, which
  drops the absolute value for inputs known to be non-negative, is a shortcut with the same
  values on such inputs, so it is not offered.
- The statistics (the norms and s^) are computed in at least float32: under bf16 autocast the
  input often arrives in bf16, whose 8-bit mantissa would spoil a sum over H W squares. The
  output keeps the input's dtype.
- Placement: the paper (and its code) applies GCT before *every* convolution; here, like
  every module of this library, it is placed by the backbone (``placement="block"``: once per
  residual block, where SE goes), so a GCT ResNet here has fewer GCT units (and parameters,
  3 C each) than the paper's. ResNet-50: 3 x 15,104 = 45,312 parameters at the 16 block
  outputs, against 3 x 22,531 = 67,593 before its 53 convolutions (stem and projection
  shortcuts included), 25.60M against 25.62M in all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input

MODES = ("l2", "l1")


@register_attention("gct")
class GatedChannelTransformation(nn.Module):
    def __init__(self, channels: int, mode: str = "l2", epsilon: float = 1e-5) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (
            not isinstance(epsilon, (int, float))
            or isinstance(epsilon, bool)
            or not 0 < epsilon < float("inf")
        ):
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self.channels = channels
        self.mode = mode
        self.epsilon = float(epsilon)
        self.alpha = nn.Parameter(torch.ones(channels))  # embedding weight
        self.gamma = nn.Parameter(torch.zeros(channels))  # gating weight
        self.beta = nn.Parameter(torch.zeros(channels))  # gating bias

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """1 + tanh(gamma s^ + beta), shape (N, C, 1, 1), in at least float32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        alpha, gamma, beta = (
            p.to(dtype).view(1, -1, 1, 1) for p in (self.alpha, self.gamma, self.beta)
        )
        if self.mode == "l2":
            embedding = alpha * (x.square().sum(dim=(2, 3), keepdim=True) + self.epsilon).sqrt()
            total = (embedding.square().sum(dim=1, keepdim=True) + self.epsilon).sqrt()
            normalised = math.sqrt(self.channels) * embedding / total
        else:
            embedding = alpha * x.abs().sum(dim=(2, 3), keepdim=True)
            total = embedding.abs().sum(dim=1, keepdim=True) + self.epsilon
            normalised = self.channels * embedding / total
        return 1 + torch.tanh(gamma * normalised + beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "gct")
        return x * self.gate(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}, epsilon={self.epsilon:g}"
