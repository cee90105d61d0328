"""ECA: Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu, CVPR 2020).

    y = GAP(F)                                        (C values per sample)
    w = sigmoid(C1D_k(y))                             (1-D conv across channels, no bias)
    k = |log2(C)/gamma + b/gamma|_odd                 (HAM paper Eq. 6, ECA Eq. 12)
    out = w * F

Defaults: gamma = 2, b = 1, so k = 3 for C = 16..64 and k = 5 for C = 128..256.
``kernel_size`` fixes k instead (must be odd, so that the conv keeps C outputs with
symmetric "same" padding). |t|_odd is the nearest odd number, ties rounded up, which is
what ECA's code computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, eca_kernel_size


@register_attention("eca")
class EfficientChannelAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2.0,
        b: float = 1.0,
    ) -> None:
        super().__init__()
        self.channels = channels
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, b)
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {k!r}")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights, shape (N, C, 1, 1)."""
        y = x.mean(dim=(2, 3)).unsqueeze(1)  # (N, 1, C)
        return torch.sigmoid(self.conv(y)).view(x.shape[0], -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "eca")
        return x * self.gate(x)
