"""DANet: Dual Attention Network (Fu, Liu, Tian, Li, Bao, Fang, Lu, CVPR 2019).

Two self-attention modules, registered separately: ``danet_pam`` (position attention, Sec.
3.2) and ``danet_cam`` (channel attention, Sec. 3.3). A is the input (C, H, W), N = H W
positions, reshaped to A in R^{C x N} where needed.

Position attention (``danet_pam``, ``PositionAttention``):
    B, C, D = conv_1x1(A)  (B, C: C -> C/r; D: C -> C; all with bias)
    s_ji = exp(B_i . C_j) / sum_{i=1}^N exp(B_i . C_j)        (Eq. 1, an N x N map)
    E_j  = alpha sum_{i=1}^N (s_ji D_i) + A_j                  (Eq. 2)
alpha (``gamma`` here, as in the code) is a learnable scalar initialised to 0, so the module
starts as the identity. We write it as S = softmax(Q^T K) over the key axis and
E = gamma (D S^T) + A, with Q from the conv named ``query`` and K from ``key``.

Channel attention (``danet_cam``, ``ChannelAttention``), no convolutions:
    x_ji = exp(A_i . A_j) / sum_{i=1}^C exp(A_i . A_j)        (Eq. 3, a C x C map)
    E_j  = beta sum_{i=1}^C (x_ji A_i) + A_j                   (Eq. 4)
beta is a learnable scalar initialised to 0. A A^T is symmetric, so Eq. 3 is a plain
row softmax of A A^T and E = beta (X A) + A.

Defaults and choices, where ours differ from the paper or from the official code
(junfu1115/DANet, ``encoding/nn/da_att.py``):
- Query/key naming. Eq. 1 normalises over i, the index of B, so the paper's query (the
  output position j) is C_j and its keys are B_i. The official code calls B the query and
  normalises over C's index. Both convs have the same shape and initialisation, so the two
  readings differ only in which conv is called B; we follow the code: ``query`` = B,
  ``key`` = C.
- Width of B and C: the paper's text gives {B, C} in R^{C x H x W}; the official code
  reduces them to C/8. ``reduction`` (default 8, the code's) sets the width
  ``max(1, C // reduction)`` (``reduced_channels``; the code's ``C // 8`` is 0 for C < 8);
  ``reduction=1`` is the paper's text.
- No 1/sqrt(d) scaling: the equations have none, so ``scaled_dot_product_attention`` is
  called with ``scale=1.0``. Its fused CPU kernel never stores the N x N map, but it needs
  equal widths for Q, K and D and unit stride along the channels; otherwise torch falls
  back to a path that builds the map. So Q, K, D are laid out as contiguous (N, HW, C)
  tensors, and Q and K are zero-padded to D's width, which leaves every dot product
  unchanged. (Measured on a CIFAR stage-1 map, N = 1024 positions, batch 128, C = 16,
  C' = 2, forward + backward: fallback 16 s and 2.1 GB, padded 2.9 s and 0.6 GB.)
- ``recompute=True`` (default): in training, the position path's intermediates (Q, K, D
  as token matrices, the attention output and its log-sum-exp, about five feature-map
  copies per module) are recomputed in backward (``torch.utils.checkpoint``) instead of
  kept. Same outputs and gradients. Measured on resnet56 + csm, batch 128 (peak resident
  memory of a training step above the plain network's, ``attnzoo profile``): 2.50x
  without, 1.40x with, for about 13% more step time.
- CAM softmax: the official code computes softmax(max_i(A A^T) - A A^T) row-wise, that is
  softmax(-A A^T), which weights the *least* similar channels most; that is not Eq. 3. The
  DANet authors answer in their issue tracker that the code's form keeps training from
  diverging. ``energy="code"`` gives the code's form; by default (``"paper"``) we
  follow Eq. 3, a plain softmax of A A^T (torch's softmax subtracts the row max internally,
  which is mathematically the same and keeps large energies finite). Note that with the
  paper's form the diagonal ||A_j||^2 often dominates the row when N is large, so X tends to
  the identity.
- gamma and beta are 0-dim parameters (the code uses shape (1,)); the count is the same.
- Mixed precision: the energies (Q^T K, A A^T) and their softmax run in float32 with
  autocast off (``layers.in_float32``), since fp16 energies overflow past 65504.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..registry import register_attention
from .layers import check_input, in_float32, reduced_channels


def position_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """D S^T with S = softmax(Q^T K) over the key axis, without a 1/sqrt(d) scale.

    ``query``, ``key``: (N, C', H, W); ``value``: (N, C, H, W); returns (N, C, H, W) in
    ``value``'s dtype. The energies and the softmax run in float32 (``in_float32``), and
    with them the weighted sum of D (one fused kernel); a convex combination of D's columns
    is within D's range, so the cast back to D's dtype cannot overflow.
    """
    return _position_attention(query, key, value).to(value.dtype)


@in_float32
def _position_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    n, c, h, w = value.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        # (N, 1, HW, C) with unit stride on C: the fused kernel needs that (a strided view
        # sends torch to its fallback, which builds the HW x HW matrix).
        return t.permute(0, 2, 3, 1).reshape(n, 1, h * w, t.shape[1]).contiguous()

    q, k, v = tokens(query), tokens(key), tokens(value)
    # Equal widths let torch use its fused kernel; zero columns add nothing to Q^T K.
    width = max(q.shape[-1], c)
    if q.shape[-1] < width:
        q = F.pad(q, (0, width - q.shape[-1]))
        k = F.pad(k, (0, width - k.shape[-1]))
    if c < width:
        v = F.pad(v, (0, width - c))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :c]
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


@register_attention("danet_pam")
class PositionAttention(nn.Module):
    """E = gamma (D S^T) + A, S = softmax over positions of B^T C (DANet Eqs. 1-2)."""

    def __init__(self, channels: int, reduction: float = 8, recompute: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.recompute = recompute
        qk_channels = reduced_channels(channels, reduction)
        self.query = nn.Conv2d(channels, qk_channels, 1)  # B
        self.key = nn.Conv2d(channels, qk_channels, 1)  # C
        self.value = nn.Conv2d(channels, channels, 1)  # D
        self.gamma = nn.Parameter(torch.zeros(()))

    def _aggregate(self, x: torch.Tensor) -> torch.Tensor:
        return position_attention(self.query(x), self.key(x), self.value(x))

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """D S^T, the attention path before the gamma scale, shape (N, C, H, W).

        With ``recompute`` (the default) and gradients on, the path's intermediates (B, C,
        D as token matrices, the attention output and its log-sum-exp: about five copies
        of the feature map) are not kept for backward but recomputed there from x
        (``torch.utils.checkpoint``). The outputs and gradients are the same."""
        if self.recompute and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self._aggregate, x, use_reentrant=False)
        return self._aggregate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "danet_pam")
        return x + self.gamma * self.aggregate(x)  # x first: output keeps x's layout


CAM_ENERGIES = ("paper", "code")


@in_float32
def channel_weights(a: torch.Tensor, code_energy: bool = False) -> torch.Tensor:
    """X = softmax(A A^T) row-wise for A (N, C, HW), or softmax(max_row(A A^T) - A A^T) with
    ``code_energy``; (N, C, C) in float32 at least (``in_float32``: A A^T sums HW squares,
    which overflow fp16 for entries of A above ~ sqrt(65504 / HW))."""
    energy = torch.bmm(a, a.transpose(1, 2))  # (N, C, C)
    if code_energy:
        # max - energy: the row's shift cancels in the softmax, so this is softmax(-A A^T)
        energy = energy.amax(dim=-1, keepdim=True) - energy
    return torch.softmax(energy, dim=-1)


@register_attention("danet_cam")
class ChannelAttention(nn.Module):
    """E = beta (X A) + A, X = softmax(A A^T) row-wise (DANet Eqs. 3-4, ``energy="paper"``)
    or X = softmax(max_row(A A^T) - A A^T) (the official code, ``energy="code"``)."""

    def __init__(self, channels: int, energy: str = "paper") -> None:
        super().__init__()
        if energy not in CAM_ENERGIES:
            raise ValueError(f"energy must be one of {CAM_ENERGIES}, got {energy!r}")
        self.channels = channels
        self.energy = energy
        self.beta = nn.Parameter(torch.zeros(()))

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """X A, the attention path before the beta scale, shape (N, C, H, W)."""
        a = x.flatten(2)  # (N, C, HW)
        weights = channel_weights(a, self.energy == "code")
        return torch.bmm(weights.to(a.dtype), a).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "danet_cam")
        return x + self.beta * self.aggregate(x)
