"""EMA: Efficient Multi-scale Attention (Ouyang, He, Zhang, Luo, Guo, Zhan, Huang, "Efficient
Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023, arXiv:2305.13563;
official code YOLOonMe/EMA-attention-module, file ``EMA_attention_module``).

The C channels are split into G groups of c = C / G consecutive channels; every group goes
through the same small network (its weights are shared by the groups) and is re-weighted by
its own spatial map. For one group X (c, H, W) of one sample:

  1x1 branch (coordinate attention without reduction):
    z^h_k(h) = 1/W sum_w X_k(h, w),   z^w_k(w) = 1/H sum_h X_k(h, w)     X and Y avg pools
    [a^h; a^w] = F_1([z^h; z^w])       one shared 1x1 conv c -> c (with bias) over the
                                       H + W positions of both descriptors side by side
    X1 = GN(X * sigmoid(a^h) * sigmoid(a^w))      GroupNorm with c groups (one per channel)
  3x3 branch:
    X3 = F_3(X)                        3x3 conv c -> c (with bias), padding 1
  cross-spatial learning:
    p1 = softmax_k(mean_{h,w} X1_k),   p3 = softmax_k(mean_{h,w} X3_k)   (c,) each
    A(h, w) = sum_k p1_k X3_k(h, w) + sum_k p3_k X1_k(h, w)      one (H, W) map per group
    Y = X * sigmoid(A)

Parameters per module: F_1 c^2 + c, F_3 9 c^2 + c, GN 2 c (for C = 256, G = 32: 672).

Choices, with the official code:
- ``groups`` G = 32 by default (the code's ``factor``). The code asserts C // G > 0 and its
  reshape needs G to divide C; we use the largest divisor of C that is at most ``groups``
  (C = 16 -> 16 groups, C = 300 -> 30), so every group has at least one channel;
  ``self.groups`` holds the number used. With one channel per group (C <= G, for example
  C = 16 or 32 at the default) both softmaxes are exactly 1 and A = X3 + X1.
- The GroupNorm normalises each channel of each group over its H x W positions (the code's
  ``GroupNorm(c, c)``). Consequence kept from the code: the spatial mean of X1_k is exactly
  GN's shift beta_k, so p1 = softmax(beta) whatever the input.
- On a 1 x 1 map GN returns its shift (one value per channel), so X1 = beta there.
- Mixed precision: the channel means (the energies) and both softmaxes run in float32 with
  autocast off (``channel_softmax``, as ``layers.in_float32``); the cross products run in the
  maps' (autocast) dtype.
- Placement: in every residual block, where SE and coordinate attention go (the official
  README compares EMA with CA and NAM at the same positions).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import autocast_off, check_input, largest_divisor_at_most


def channel_softmax(t: torch.Tensor) -> torch.Tensor:
    """softmax over the c channels of t's spatial means, (N G, c) from (N G, c, H, W), in
    float32 at least: the means accumulate into float32 and the softmax runs with autocast
    off (as ``layers.in_float32``, without a float32 copy of the whole map)."""
    dtype = torch.promote_types(t.dtype, torch.float32)
    with autocast_off(t.device.type):
        return torch.softmax(t.mean(dim=(2, 3), dtype=dtype), dim=1)


@register_attention("ema")
class EfficientMultiScaleAttention(nn.Module):
    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        self.channels = channels
        self.groups = largest_divisor_at_most(channels, groups)
        width = channels // self.groups
        self.conv1x1 = nn.Conv2d(width, width, 1)
        self.conv3x3 = nn.Conv2d(width, width, 3, padding=1)
        self.gn = nn.GroupNorm(width, width)

    def spatial_logits(self, grouped: torch.Tensor) -> torch.Tensor:
        """A for every group, (N G, 1, H, W), from the grouped input (N G, c, H, W)."""
        h, w = grouped.shape[2:]
        z_h = grouped.mean(dim=3, keepdim=True)  # (NG, c, H, 1)
        z_w = grouped.mean(dim=2, keepdim=True).transpose(2, 3)  # (NG, c, W, 1)
        a_h, a_w = self.conv1x1(torch.cat([z_h, z_w], dim=2)).split([h, w], dim=2)
        x1 = self.gn(grouped * torch.sigmoid(a_h) * torch.sigmoid(a_w).transpose(2, 3))
        x3 = self.conv3x3(grouped)
        p1 = channel_softmax(x1).to(x3.dtype)  # (NG, c)
        p3 = channel_softmax(x3).to(x1.dtype)
        cross = torch.einsum("bk,bkhw->bhw", p1, x3) + torch.einsum("bk,bkhw->bhw", p3, x1)
        return cross.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "ema")
        n, c, h, w = x.shape
        grouped = x.reshape(n * self.groups, c // self.groups, h, w)
        gate = torch.sigmoid(self.spatial_logits(grouped))
        return (grouped * gate.to(x.dtype)).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
