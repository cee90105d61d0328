"""RCCA: recurrent criss-cross attention (Huang, Wang, Huang, Huang, Wei, Liu, CCNet, ICCV 2019).

For an input H (C, h, w) with positions u:
    Q, K = conv_1x1(H): C -> C' = C/8;  V = conv_1x1(H): C -> C   (all with bias)
    Omega_u / Phi_u: the K / V vectors on u's criss-cross path, i.e. its row and its column,
        h + w - 1 positions, u itself counted once
    d_{i,u} = Q_u . Omega_{i,u}                                  (Eq. 1, affinity)
    A_u     = softmax_i(d_{., u})   one joint softmax over all h + w - 1 energies
    H'_u    = gamma sum_i A_{i,u} Phi_{i,u} + H_u                (Eq. 2, aggregation)
Recurrence (Sec. 3.2): the criss-cross module is applied R times, R = 2 by default, with
the *same* weights each time (H'' = CCA(H'), ...), so after two loops every position has
received information from every other one.

Defaults and choices:
- gamma: Eq. 2 adds the aggregation to H_u unscaled; the official code
  (speedinghzl/CCNet) multiplies it by a learnable scalar gamma initialised to 0, which we
  follow (the module starts as the identity). The residual and gamma sit inside each
  recurrence step, as in the code, where the whole module is looped.
- The pixel itself is counted once (h + w - 1 positions, as the paper says). The official
  code does the same: its CUDA kernel writes h + w - 1 weights per pixel, and its
  pure-PyTorch version adds -inf to the column energy of the pixel itself before joining
  row and column. A naive row + column concatenation without that mask counts it twice.
  We use the same mask: the column energies at u itself are set to -inf.
- C' = ``max(1, C // reduction)``, ``reduction`` = 8 (the code's C // 8 is 0 for C < 8).
- No 1/sqrt(C') scale: Eq. 1 has none.
- Pure PyTorch and device-agnostic (the official pure-PyTorch version hard-codes
  ``.cuda()``): two einsums give the column (h) and row (w) energies, one softmax runs over
  their concatenation, and two einsums aggregate V.
- Mixed precision: the energies d and their softmax run in float32 with autocast off
  (``layers.in_float32``; fp16 energies overflow past 65504); the aggregation of V runs in
  V's (autocast) dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, in_float32, reduced_channels


def criss_cross_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """sum_i A_{i,u} Phi_{i,u} for every position u (Eqs. 1-2 without the residual).

    ``query``, ``key``: (N, C', H, W); ``value``: (N, C, H, W); returns (N, C, H, W).
    """
    height = query.shape[2]
    weights = criss_cross_weights(query, key).to(value.dtype)
    column_weights, row_weights = weights.split([height, weights.shape[-1] - height], dim=-1)
    return torch.einsum("nyxg,ncgx->ncyx", column_weights, value) + torch.einsum(
        "nyxv,ncyv->ncyx", row_weights, value
    )


@in_float32
def criss_cross_weights(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """A (Eq. 1 and the joint softmax), (N, H, W, H + W): for each position (y, x) its
    weights over column (g, x) then row (y, v); float32 at least (``in_float32``)."""
    height = query.shape[2]
    # column[n, y, x, g] = Q(y, x) . K(g, x); row[n, y, x, v] = Q(y, x) . K(y, v)
    column = torch.einsum("ncyx,ncgx->nyxg", query, key)
    row = torch.einsum("ncyx,ncyv->nyxv", query, key)
    # u itself is in both; drop it from the column so it is counted once.
    self_mask = torch.eye(height, dtype=torch.bool, device=query.device)[:, None, :]
    column = column.masked_fill(self_mask, float("-inf"))
    return torch.softmax(torch.cat([column, row], dim=-1), dim=-1)


@register_attention("rcca")
class RecurrentCrissCrossAttention(nn.Module):
    def __init__(self, channels: int, reduction: float = 8, recurrence: int = 2) -> None:
        super().__init__()
        if isinstance(recurrence, bool) or not isinstance(recurrence, int) or recurrence < 1:
            raise ValueError(f"recurrence must be an int >= 1, got {recurrence!r}")
        self.channels = channels
        self.recurrence = recurrence
        qk_channels = reduced_channels(channels, reduction)
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """One criss-cross attention pass: gamma * aggregation + x."""
        aggregated = criss_cross_attention(self.query(x), self.key(x), self.value(x))
        return x + self.gamma * aggregated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "rcca")
        for _ in range(self.recurrence):  # same weights every pass
            x = self.step(x)
        return x
