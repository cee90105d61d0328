"""Pyramid split attention, the convolution of EPSANet (Zhang, Zu, Lu, Zou, Meng, "EPSANet: An
Efficient Pyramid Squeeze Attention Block on Convolutional Neural Network", ACCV 2022,
arXiv:2105.14447; official code murufeng/EPSANet, ``epsanet.py``).

A conv-level module: it replaces a block's 3x3 convolution (C_in -> C, stride s). With S
scales (S = 4):

    F_i = Conv(k_i x k_i, G_i)(X),  i = 0 .. S-1,  each C_in -> C / S     (SPC, Eqs. 1-3)
          k_i = 2 (i + 1) + 1 = 3, 5, 7, 9
    Z_i = SEWeight(F_i) = sigmoid(W_1 ReLU(W_0 GAP(F_i)))                  (Eq. 4)
    att_i = exp(Z_i) / sum_j exp(Z_j)       softmax over the S scales,
                                            per channel                    (Eqs. 5-7)
    out = [F_0 * att_0; ...; F_{S-1} * att_{S-1}]                          (Eqs. 8-9)

The block keeps its BN and ReLU after this conv (EPSANet's bottleneck is conv1x1-BN-ReLU,
PSA-BN-ReLU, conv1x1-BN).

Choices:
- ``groups=(1, 4, 8, 16)``: the official EPSANet-50 (Small) settings. The paper's rule
  G = 2^((k - 1) / 2) gives 2 for the 3x3 conv, where the code uses 1; we follow the code,
  whose networks the paper's parameter counts describe: EPSANet-50 (Small) 22.56M and
  3.62 GFLOPs, ours 22,561,715 and 3.60 GMACs; EPSANet-101 (Small) 38.90M, ours 38,900,279.
  Where a group count does not divide C_in and C / S (CIFAR widths), it is lowered to the
  largest count that divides both.
- One SEWeight module, shared by the S scales (as the code; Eq. 4 applies "SEWeight" to each),
  r = 16 with at least one hidden unit, its 1x1 convs with biases.
- The S scales' convs have no biases; padding k // 2 keeps the size (stride s).
- The softmax over scales runs in float32 under autocast.
- Built with ``create_attention("epsa", C)`` it maps C -> C at stride 1 (C divisible by S).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, largest_divisor_at_most, softmax_float32


@register_attention("epsa", level="conv")
class PyramidSplitAttention(nn.Module):
    normalizes_output = False  # the block's BN after the replaced conv stays

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        groups: int = 1,
        kernels: tuple[int, ...] = (3, 5, 7, 9),
        scale_groups: tuple[int, ...] = (1, 4, 8, 16),
        reduction: float = 16,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        for name, value in (("out_channels", out_channels), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kernels = tuple(kernels) if isinstance(kernels, (list, tuple)) else kernels
        scale_groups = (
            tuple(scale_groups) if isinstance(scale_groups, (list, tuple)) else scale_groups
        )
        if (
            not isinstance(kernels, tuple)
            or not kernels
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0
                   for k in kernels)
        ):  # fmt: skip
            raise ValueError(f"kernels must be odd positive ints, got {kernels!r}")
        if (
            not isinstance(scale_groups, tuple)
            or len(scale_groups) != len(kernels)
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in scale_groups)
        ):
            raise ValueError(
                f"scale_groups must be {len(kernels)} positive ints (one per kernel), "
                f"got {scale_groups!r}"
            )
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        scales = len(kernels)
        if out_channels % scales:
            raise ValueError(
                f"out_channels={out_channels} must be divisible by the number of scales "
                f"({scales}, one per kernel)"
            )
        # ``groups`` (the backbone's cardinality) is accepted for the conv-level interface; the
        # scales' own group counts are ``scale_groups``.
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.kernels = kernels
        part = out_channels // scales
        self.scale_convs = nn.ModuleList(
            nn.Conv2d(
                channels,
                part,
                k,
                stride,
                k // 2,
                bias=False,
                groups=largest_divisor_at_most(math.gcd(channels, part), g),
            )  # fmt: skip
            for k, g in zip(kernels, scale_groups, strict=True)
        )
        hidden = max(1, int(part // reduction))
        self.se = nn.Sequential(  # SEWeight, shared by the scales
            nn.Conv2d(part, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, part, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "epsa")
        feats = torch.stack([conv(x) for conv in self.scale_convs], dim=1)  # (N, S, C/S, H, W)
        n, s, part, h, w = feats.shape
        pooled = feats.mean(dim=(3, 4), keepdim=True).view(n * s, part, 1, 1)
        z = torch.sigmoid(self.se(pooled)).view(n, s, part, 1, 1)  # Eq. 4
        attention = softmax_float32(z, 1)  # Eqs. 5-7
        return (feats * attention).reshape(n, s * part, h, w)  # Eqs. 8-9

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, "
            f"stride={self.stride}, kernels={self.kernels}"
        )
