"""Shuffle Attention (Zhang, Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural
Networks", ICASSP 2021, arXiv:2102.00240; official code wofmanaf/SA-Net,
``models/sa_resnet.py``, class ``sa_layer``).

X (N, C, H, W) is split into G groups X_k of C/G consecutive channels, and each X_k into two
halves X_k1 (its first C/2G channels) and X_k2 (the rest). With sigma the sigmoid, the
paper's equations are

    channel branch:  s     = F_gp(X_k1) = 1/(H W) sum_{i,j} X_k1(i, j)
                     X'_k1 = sigma(W_1 s + b_1) . X_k1
    spatial branch:  X'_k2 = sigma(W_2 . GN(X_k2) + b_2) . X_k2
    X'_k = [X'_k1, X'_k2];  all groups back in order;  then a channel shuffle with 2 groups:
    out channel 2j + t = aggregated channel t C/2 + j   (t = 0, 1; j < C/2).

W_1, b_1, W_2, b_2 have shape C/2G: a per-channel scale and shift ("F_c" is not an FC
layer), and, as in the official code, the same C/2G values serve every group k. GN is a
GroupNorm with one group per channel (each channel of X_k2 normalised over its H W
positions, biased variance, eps = 1e-5) and its own per-channel affine, again shared by the
groups. In all 6 C/2G = 3 C/G parameters per module.

Choices:
- ``groups`` G = 64 by default (the official code's). Each group needs two equal halves, so
  C must be even and G must divide C/2; when the requested G does not, we use the largest
  divisor of C/2 that is at most G (C = 16 -> 8 groups of 2 channels, one per branch);
  ``self.groups`` holds the number used. A ResNet-50 (C = 256 ... 2048) gets exactly 64. An
  odd C raises.
- Initialisation as in the official code: W_1 = W_2 = 0, b_1 = b_2 = 1 (every gate starts at
  sigmoid(1)), GN's affine 1 and 0.
- GN's affine is redundant with W_2, b_2 (an affine map of an affine map), as in the official
  code; we keep it so that the parameter count and the function class are the code's.
- On a 1 x 1 map GN's output is its bias (the normalised value is 0), as ``nn.GroupNorm``.
- GN's statistics are computed in at least float32 (bf16 autocast hands over bf16 maps).
- Placement: in every residual block, after the last BN of the residual branch (official
  code), where SE goes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, largest_divisor_at_most

EPSILON = 1e-5


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: channel t (C/groups) + j goes to j groups + t."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@register_attention("shuffle")
class ShuffleAttention(nn.Module):
    def __init__(self, channels: int, groups: int = 64) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if channels % 2:
            raise ValueError(
                f"shuffle splits each group into two equal halves: channels must be even, "
                f"got {channels}"
            )
        self.channels = channels
        self.groups = largest_divisor_at_most(channels // 2, groups)
        half = channels // (2 * self.groups)  # C/2G channels in each branch of a group
        self.channel_weight = nn.Parameter(torch.zeros(half))  # W_1
        self.channel_bias = nn.Parameter(torch.ones(half))  # b_1
        self.spatial_weight = nn.Parameter(torch.zeros(half))  # W_2
        self.spatial_bias = nn.Parameter(torch.ones(half))  # b_2
        self.norm_weight = nn.Parameter(torch.ones(half))  # GN's affine
        self.norm_bias = nn.Parameter(torch.zeros(half))

    @staticmethod
    def _per_channel(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return param.to(dtype).view(1, 1, -1, 1, 1)

    def channel_gate(self, x_k1: torch.Tensor) -> torch.Tensor:
        """sigma(W_1 F_gp(X_k1) + b_1) for X_k1 (N, G, C/2G, H, W): (N, G, C/2G, 1, 1)."""
        dtype = torch.promote_types(x_k1.dtype, torch.float32)
        pooled = x_k1.to(dtype).mean(dim=(3, 4), keepdim=True)
        return torch.sigmoid(
            self._per_channel(self.channel_weight, dtype) * pooled
            + self._per_channel(self.channel_bias, dtype)
        )

    def spatial_gate(self, x_k2: torch.Tensor) -> torch.Tensor:
        """sigma(W_2 GN(X_k2) + b_2) for X_k2 (N, G, C/2G, H, W): same shape."""
        dtype = torch.promote_types(x_k2.dtype, torch.float32)
        values = x_k2.to(dtype)
        variance, mean = torch.var_mean(values, dim=(3, 4), keepdim=True, correction=0)
        normalised = (values - mean) * torch.rsqrt(variance + EPSILON)
        normed = normalised * self._per_channel(self.norm_weight, dtype) + self._per_channel(
            self.norm_bias, dtype
        )
        return torch.sigmoid(
            self._per_channel(self.spatial_weight, dtype) * normed
            + self._per_channel(self.spatial_bias, dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "shuffle")
        n, c, h, w = x.shape
        halves = x.reshape(n, self.groups, 2, c // (2 * self.groups), h, w)
        x_k1, x_k2 = halves[:, :, 0], halves[:, :, 1]
        attended = torch.stack(
            [
                x_k1 * self.channel_gate(x_k1).to(x.dtype),
                x_k2 * self.spatial_gate(x_k2).to(x.dtype),
            ],
            dim=2,
        )
        return channel_shuffle(attended.reshape(n, c, h, w), 2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
