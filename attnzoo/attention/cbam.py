"""CBAM: Convolutional Block Attention Module (Woo, Park, Lee, Kweon, ECCV 2018).

Equations (numbers as in Woo et al.):
    M_c(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))                (Eq. 2)
             MLP: C -> C/r -> C with ReLU, shared by both descriptors, biases on
    F'  = M_c(F) * F                                                    (Eq. 1)
    M_s(F') = sigmoid(BN(f^{7x7}([AvgPool_c(F'); MaxPool_c(F')])))      (Eq. 3)
    F'' = M_s(F') * F'                                                  (Eq. 1)

Defaults: r = 16 with the hidden width ``max(1, C // r)`` (``rd_rule`` as for SE), a 7x7
spatial conv with no bias, followed by BN. The paper's Eq. 3 shows no BN; the official code
(Jongchan/attention-module, ``MODELS/cbam.py``) has one, and so do HAM's re-implementation
and this library's spec. Where ours and the official code still differ:
- BN momentum: PyTorch's 0.1 by default; the official code's BN uses 0.01, which
  ``bn_momentum=0.01`` gives (it changes only how fast the running statistics follow).
- Descriptor order: ours is [AvgPool_c; MaxPool_c] as Eq. 3 writes it
  (``pool_order="mean_max"``, the default); the official ``ChannelPool`` stacks [max; mean]
  (``pool_order="max_mean"``). The function is the same up to the order of the conv's two
  input channels: a ``"max_mean"`` module whose ``spatial.conv.weight[:, 0]`` and ``[:, 1]``
  are swapped computes exactly what the ``"mean_max"`` one does. It matters only for
  weights: ``attnzoo.convert.load_official`` swaps the two channels of the official
  checkpoints for a ``"mean_max"`` model and copies them as they are for a ``"max_mean"`` one.

Options:
- ``spatial=False``: channel branch only ("CBAM (channel)" in HAM Table 1).
- ``adaptive=True``: HAM's adaptive mix (HAM Eq. 5) replaces the sum of the two MLP
  outputs: M_c = sigmoid(MLP(F_add)), F_add = 1/2 (F_avg + F_max) + alpha F_avg + beta F_max,
  which is "CBAM (channel, adaptive)" in HAM Table 1. Our reading: the mix feeds the
  shared transform once, exactly as in HAM's channel branch.
- ``max_pool=False``: no max-pooling anywhere, "CBAM (wmp)" in GAM Table 4: the channel
  gate is sigmoid(MLP(AvgPool(F))) and the spatial descriptor is AvgPool_c(F') alone.
  (GAM does not say which of the two poolings it dropped; it says max-pooling "reduces the
  information", so we drop both. It cannot be combined with ``adaptive``.)
- ``pool_order="max_mean"``: the official code's [MaxPool_c; AvgPool_c] spatial descriptor
  (above); ``"mean_max"`` (default) is Eq. 3's. No effect with ``max_pool=False``.

Implementation: each gate (pooling, MLP or conv + BN, sigmoid, scaling) runs as one fused
autograd node (``layers.pooled_gate``): same values, fewer passes over F in backward. On the CPU (float32, bf16) and on CUDA
(Triton) the node runs on the fused gate kernels of ``attnzoo.kernels`` (``attention/fused.py``:
one read of the map per pass, 4 passes forward and backward); ``ATTNZOO_KERNELS=off`` or
``layers.plain_gates()`` selects the PyTorch path.
The spatial gate's 7 x 7 conv runs on the kernels' direct conv (``layers.gate_conv2d``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import (
    AdaptivePoolMix,
    SpatialGate,
    check_input,
    gate_conv2d,
    global_max_pool,
    pooled_gate,
    reduced_channels,
)

POOL_ORDERS = ("mean_max", "max_mean")


def check_pool_order(pool_order: str) -> str:
    if pool_order not in POOL_ORDERS:
        raise ValueError(
            f"unknown pool_order {pool_order!r}; choose one of: {', '.join(POOL_ORDERS)}"
        )
    return pool_order


class OrderedSpatialGate(SpatialGate):
    """``SpatialGate`` whose two-channel descriptor is [mean; max] (``pool_order="mean_max"``)
    or the official code's [max; mean] (``"max_mean"``). Same parameters and names."""

    def __init__(
        self,
        kernel_size: int = 7,
        max_pool: bool = True,
        bn_momentum: float = 0.1,
        pool_order: str = "mean_max",
    ) -> None:
        super().__init__(kernel_size, max_pool, bn_momentum)
        self.pool_order = check_pool_order(pool_order)

    def logits(self, mean: torch.Tensor, max_: torch.Tensor | None) -> torch.Tensor:
        if max_ is None or self.pool_order == "mean_max":
            return super().logits(mean, max_)
        return self.bn(gate_conv2d(torch.cat([max_, mean], dim=1), self.conv))


@register_attention("cbam")
class CBAM(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_rule: str = "floor",
        spatial: bool = True,
        adaptive: bool = False,
        kernel_size: int = 7,
        max_pool: bool = True,
        bn_momentum: float = 0.1,
        pool_order: str = "mean_max",
    ) -> None:
        super().__init__()
        check_pool_order(pool_order)
        if adaptive and not max_pool:
            raise ValueError("adaptive mixes the avg- and max-pooled descriptors: needs max_pool")
        self.max_pool = max_pool
        self.channels = channels
        hidden = reduced_channels(channels, reduction, rd_rule)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1)
        )
        self.mix = AdaptivePoolMix() if adaptive else None
        self.spatial = (
            OrderedSpatialGate(kernel_size, max_pool, bn_momentum, pool_order) if spatial else None
        )

    def channel_logits(self, avg: torch.Tensor, max_: torch.Tensor | None) -> torch.Tensor:
        """The logits of M_c from the pooled descriptors (N, C, 1, 1)."""
        if max_ is None:
            return self.mlp(avg)
        if self.mix is not None:
            return self.mlp(self.mix(avg, max_))
        # One MLP call on both descriptors stacked along the batch.
        both = self.mlp(torch.cat([avg, max_], dim=0))
        return both[: avg.shape[0]] + both[avg.shape[0] :]

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """M_c(F), shape (N, C, 1, 1)."""
        avg = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(
            self.channel_logits(avg, global_max_pool(x) if self.max_pool else None)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "cbam")
        params = tuple(self.mlp.parameters()) + tuple(self.mix.parameters() if self.mix else ())
        x = pooled_gate(x, (((2, 3), self.max_pool, self.channel_logits),), params)[0]
        if self.spatial is not None:
            x = self.spatial(x)
        return x
