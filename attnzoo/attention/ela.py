"""ELA: Efficient Local Attention (Xu, Wan, "ELA: Efficient Local Attention for Deep
Convolutional Neural Networks", arXiv:2403.01123, 2024).

Coordinate attention without its channel reduction and BatchNorm: each spatial direction
gets its own gate from a strip-pooled descriptor, through a 1-D convolution along that
direction and a GroupNorm. For X (N, C, H, W):

    z^h_c(h) = 1/W sum_w X_c(h, w)            pooled along the width    (N, C, H)
    z^w_c(w) = 1/H sum_h X_c(h, w)            pooled along the height   (N, C, W)
    y^h      = sigmoid(GN(F_k(z^h)))          F_k: 1-D conv, kernel k, "same" padding,
    y^w      = sigmoid(GN(F_k(z^w)))          no bias; F_k and GN shared by both directions
    Y_c(h, w) = X_c(h, w) y^h_c(h) y^w_c(w)

Variants (the paper's four settings of its three hyper-parameters: the conv's kernel size
k, its groups, and the GroupNorm's number of groups):

    variant  kernel_size  channels per conv group    GroupNorm groups
    "T"      5            1 (depthwise)              32
    "B"      7            1 (depthwise)              16
    "S"      5            8 (C/8 conv groups)        16
    "L"      7            8 (C/8 conv groups)        16

``variant="B"`` is the default. ``kernel_size``, ``channels_per_conv_group`` and
``norm_groups`` override the variant's values one by one.

Choices:
- The conv and the GroupNorm are shared between the two directions, and GN takes its
  statistics separately for z^h and for z^w (each call normalises its own sequence), as in
  the paper's code listing.
- Channel counts the settings do not divide: the GroupNorm uses the largest divisor of C
  that is at most the requested number of groups (C = 16 with "T"'s 32 groups -> 16 groups;
  C = 300 with 16 -> 15), and the conv uses the largest divisor of C that is at most
  C // channels_per_conv_group (at least 1). ``self.norm_groups`` and ``self.conv_groups``
  hold the numbers used; for C a multiple of 32 they are the paper's.
- ``kernel_size`` must be odd (an even kernel with "same" padding would change the length).
- On a 1 x 1 map, or wherever a GroupNorm group holds a single value, GN returns its shift
  there, so that gate is sigmoid(shift).
- The GroupNorm (biased variance, eps 1e-5, per-channel scale and shift: ``nn.GroupNorm``'s
  definition and parameters) is computed in at least float32, so its statistics survive
  bf16 autocast, where the conv's output arrives in bf16.
- No official repository was available to check; the settings table and the code listing
  follow the paper as widely reproduced.
- Placement: in every residual block, where SE and coordinate attention go.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, largest_divisor_at_most

# variant -> (kernel_size, channels_per_conv_group, norm_groups)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "T": (5, 1, 32),
    "B": (7, 1, 16),
    "S": (5, 8, 16),
    "L": (7, 8, 16),
}


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@register_attention("ela")
class EfficientLocalAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        variant: str = "B",
        kernel_size: int | None = None,
        channels_per_conv_group: int | None = None,
        norm_groups: int | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        default_kernel, default_width, default_groups = VARIANTS[variant]
        kernel_size = default_kernel if kernel_size is None else kernel_size
        width = default_width if channels_per_conv_group is None else channels_per_conv_group
        norm_groups = default_groups if norm_groups is None else norm_groups
        _check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size!r}")
        _check_positive_int("channels_per_conv_group", width)
        _check_positive_int("norm_groups", norm_groups)
        self.channels = channels
        self.variant = variant
        self.conv_groups = largest_divisor_at_most(channels, channels // width)
        self.norm_groups = largest_divisor_at_most(channels, norm_groups)
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=self.conv_groups,
            bias=False,
        )
        self.gn = nn.GroupNorm(self.norm_groups, channels)

    def group_norm(self, z: torch.Tensor) -> torch.Tensor:
        """``self.gn(z)`` for z (N, C, L), computed in at least float32.

        Written out because ``F.group_norm`` refuses an input whose groups hold one value
        each in the whole batch (batch 1, one channel per group, L = 1: C = 16 on a 1 x 1
        map), where the result, GN's shift, is well defined.
        """
        n, c, length = z.shape
        dtype = torch.promote_types(z.dtype, torch.float32)
        grouped = z.to(dtype).reshape(n, self.norm_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        variance = (grouped - mean).square().mean(dim=2, keepdim=True)
        normalised = ((grouped - mean) * torch.rsqrt(variance + self.gn.eps)).reshape(n, c, length)
        weight, bias = self.gn.weight.to(dtype), self.gn.bias.to(dtype)
        return normalised * weight[:, None] + bias[:, None]

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y^h, y^w): shapes (N, C, H, 1) and (N, C, 1, W), in at least float32."""
        z_h = x.mean(dim=3)  # (N, C, H)
        z_w = x.mean(dim=2)  # (N, C, W)
        y_h = torch.sigmoid(self.group_norm(self.conv(z_h)))
        y_w = torch.sigmoid(self.group_norm(self.conv(z_w)))
        return y_h.unsqueeze(3), y_w.unsqueeze(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "ela")
        y_h, y_w = self.gates(x)
        return x * y_h.to(x.dtype) * y_w.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, variant={self.variant!r}, "
            f"conv_groups={self.conv_groups}, norm_groups={self.norm_groups}"
        )
