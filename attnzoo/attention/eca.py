"""ECA: Efficient Channel Attention (Wang, Wu, Zhu, Li, Zuo, Hu, CVPR 2020).

    y = GAP(F)                                        (C values per sample)
    w = sigmoid(C1D_k(y))                             (1-D conv across channels, no bias)
    k = |log2(C)/gamma + b/gamma|_odd                 (HAM paper Eq. 6, ECA Eq. 12)
    out = w * F

Defaults: gamma = 2, b = 1, so k = 3 for C = 16..64 and k = 5 for C = 128..256.
``kernel_size`` fixes k instead (must be odd, so that the conv keeps C outputs with
symmetric "same" padding). |t|_odd is the nearest odd number, ties rounded up, as the code
listing in ECA's paper computes it. The paper and the official repository differ here: the
repository's ``eca_layer`` takes k as an argument (default 3) and its ResNets pass
``k_size=[3, 3, 3, 3]``, k = 3 in every stage whatever C; ``kernel_size=3`` reproduces that.
(For C = 16..64 the adaptive k is 3 too; they differ from C = 128 on.)

Implementation: pooling, the 1-D conv, the sigmoid and the scaling run as one fused
autograd node (``layers.pooled_gate``): same values, fewer passes over F in backward. On the CPU (float32, bf16) and on CUDA
(Triton) the node runs on the fused gate kernels of ``attnzoo.kernels`` (``attention/fused.py``:
one read of the map per pass, 4 passes forward and backward); ``ATTNZOO_KERNELS=off`` or
``layers.plain_gates()`` selects the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, eca_kernel_size, pooled_gate


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

    def logits(self, y: torch.Tensor, _max: None = None) -> torch.Tensor:
        """C1D_k(y) for the pooled y (N, C, 1, 1), same shape."""
        n, c = y.shape[:2]
        return self.conv(y.view(n, 1, c)).view(n, c, 1, 1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights, shape (N, C, 1, 1)."""
        return torch.sigmoid(self.logits(x.mean(dim=(2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "eca")
        return pooled_gate(x, (((2, 3), False, self.logits),), tuple(self.parameters()))[0]
