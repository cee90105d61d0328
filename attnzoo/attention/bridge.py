"""Bridge attention: channel attention fed by the earlier layers of a block.

BA-Net (Zhao, Chen, Zhang, Zhang, "BA-Net: Bridge Attention for Deep Convolutional Neural
Networks", arXiv:2112.04150, as cited by seed 002), as used by the enhanced channel-wise
attention paper (seed 002: Bagora, Sreeteja, Harini T K, Choudhary, Haque). A residual
block computes X_1, ..., X_n with its convolutions; X_n is the output of its last BN. With z_i = GAP(X_i) in R^{C_i}:

    s_i = BN_i(W_i z_i),            W_i: C_i -> C/r, no bias    (one projection per layer)
    S   = s_1 + ... + s_n                                       (fusion by summation)
    a   = sigmoid(W_g relu(S)),     W_g: C/r -> C, no bias
    Y   = a * X_n                                               (broadcast over H, W)

With no earlier layers (n = 1) this is an SE gate with BN and bias-free layers.

Interpretations (the seed paper gives no equations; BA-Net's text and code give these):
- Which outputs are bridged: every convolution output of the block, each after its BN and,
  for all but the last, its ReLU (what the next convolution reads). A CIFAR BasicBlock
  bridges two maps, a Bottleneck three.
- Fusion is a sum of the batch-normalised projections, as BA-Net's code does; r = 16 and the
  hidden width ``max(1, C // r)`` (the floor rule of SE/CBAM).
- Batch of one in training mode: the BatchNorm1d layers cannot take batch statistics of a
  single sample, so they normalise it with their running statistics and leave them
  unchanged (``SingleSampleSafeBatchNorm1d``, the same fix as BAM).

This is a *block-level* attention: a backbone builds it with the channel counts of the
block's earlier outputs (``earlier_channels``) and calls ``module(x, earlier)``.
``bridge_head`` below is the seed paper's own network-level variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import SingleSampleSafeBatchNorm1d, check_input, reduced_channels


def _projection(in_features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False), SingleSampleSafeBatchNorm1d(hidden)
    )


@register_attention("bridge", level="block")
class BridgeAttention(nn.Module):
    reads_earlier = True

    def __init__(
        self,
        channels: int,
        earlier_channels: Sequence[int] = (),
        reduction: float = 16,
    ) -> None:
        super().__init__()
        earlier_channels = tuple(earlier_channels)
        for c in earlier_channels:
            if not isinstance(c, int) or isinstance(c, bool) or c < 1:
                raise ValueError(f"earlier_channels must be positive ints, got {earlier_channels}")
        self.channels = channels
        self.earlier_channels = earlier_channels
        hidden = reduced_channels(channels, reduction)
        self.earlier = nn.ModuleList(_projection(c, hidden) for c in earlier_channels)
        self.current = _projection(channels, hidden)
        self.fc = nn.Linear(hidden, channels, bias=False)

    def gate(self, x: torch.Tensor, earlier: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Channel weights a, shape (N, C, 1, 1)."""
        fused = self.current(x.mean(dim=(2, 3)))
        for proj, feat in zip(self.earlier, earlier, strict=True):
            fused = fused + proj(feat.mean(dim=(2, 3)))
        return torch.sigmoid(self.fc(F.relu(fused)))[:, :, None, None]

    def forward(self, x: torch.Tensor, earlier: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        check_input(x, self.channels, "bridge")
        earlier = list(earlier)
        if len(earlier) != len(self.earlier_channels):
            raise ValueError(
                f"bridge was built for {len(self.earlier_channels)} earlier output(s) "
                f"{self.earlier_channels}, got {len(earlier)}"
            )
        for feat, c in zip(earlier, self.earlier_channels, strict=True):
            if feat.dim() != 4 or feat.shape[0] != x.shape[0] or feat.shape[1] != c:
                raise ValueError(
                    f"bridge expects earlier outputs (N={x.shape[0]}, C) with C in "
                    f"{self.earlier_channels}, got shape {tuple(feat.shape)}"
                )
        return x * self.gate(x, earlier)
