"""Building blocks shared by several attention modules.

- ``reduced_channels``: the hidden width of a reduction MLP (SE, CBAM).
- ``eca_kernel_size``: ECA's kernel-size rule, Eq. (6) of the HAM paper.
- ``AdaptivePoolMix``: HAM's adaptive mix of avg- and max-pooled descriptors, Eq. (5).
- ``SpatialGate``: CBAM's spatial gate, sigmoid(BN(conv([mean_c; max_c]))).
- ``check_input``: one clear error for a wrong input shape.
- ``SingleSampleSafeBatchNorm1d``: BatchNorm1d that survives a training batch of one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

REDUCTION_RULES = ("floor", "round8")


def reduced_channels(channels: int, reduction: float, rule: str = "floor") -> int:
    """Hidden width of a C -> C/r -> C bottleneck.

    ``"floor"``: ``max(1, C // r)``, as in Hu et al. (SE) and Woo et al. (CBAM), and what the
    parameter columns of the HAM tables imply. ``"round8"``: timm's rule, C/r rounded to the
    nearest multiple of 8 (at least 8); on CIFAR ResNets (C = 16, 32, 64, r = 16) it gives 8
    hidden units where the floor rule gives 1, 2, 4.
    """
    if reduction <= 0:
        raise ValueError(f"reduction must be > 0, got {reduction!r}")
    if rule == "floor":
        return max(1, int(channels // reduction))
    if rule == "round8":
        value = channels / reduction
        return max(8, int(value + 4) // 8 * 8)
    raise ValueError(
        f"unknown reduction rule {rule!r}; choose one of: {', '.join(REDUCTION_RULES)}"
    )


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """k = |log2(C)/gamma + b/gamma|_odd (HAM Eq. 6, from ECA).

    The nearest odd number, with ties (t an even integer) going up, as ECA's code does
    (``t = int(...); k = t if t % 2 else t + 1`` is exactly that rule).
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """max over H, W per channel, (N, C, 1, 1).

    ``F.adaptive_max_pool2d`` rather than ``amax``: same values, and its backward scatters
    the gradient to the argmax instead of building an (N, C, H, W) equality mask; on a
    CIFAR stage-1 map (128 x 16 x 32 x 32, channels_last) forward + backward takes 1.6 ms
    against 14.7 ms. At exact ties it routes the whole gradient to one of the tied
    positions (amax splits it); both are valid subgradients.
    """
    return F.adaptive_max_pool2d(x, 1)


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """max over channels per position, (N, 1, H, W); ``max`` with indices (cheaper backward
    than ``amax``, same tie caveat as ``global_max_pool``)."""
    return x.max(dim=1, keepdim=True).values


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """A few-channel descriptor laid out channels_last before a k x k conv: on this CPU the
    2 -> 1 7x7 conv's forward + backward takes 22 ms that way against 56 ms contiguous
    (batch 256, 32 x 32)."""
    return x.contiguous(memory_format=torch.channels_last)


def check_input(x: torch.Tensor, channels: int, owner: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input (N, {channels}, H, W), got shape {tuple(x.shape)}")


class AdaptivePoolMix(nn.Module):
    """F_add = 1/2 (F_avg + F_max) + alpha F_avg + beta F_max   (HAM Eq. 5).

    alpha and beta are trainable, start at 0.5 and must stay inside (0, 1). We keep them
    there by construction: each is the sigmoid of an unconstrained parameter that starts
    at 0 (so alpha = beta = 0.5 at init). With ``adaptive=False`` alpha and beta are fixed at
    0.5, which gives F_add = F_avg + F_max, the plain CBAM-style sum (the "not adaptive" rows
    of HAM Table 1).
    """

    def __init__(self, adaptive: bool = True) -> None:
        super().__init__()
        self.adaptive = adaptive
        if adaptive:
            self.alpha_logit = nn.Parameter(torch.zeros(()))
            self.beta_logit = nn.Parameter(torch.zeros(()))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit) if self.adaptive else torch.tensor(0.5)

    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.beta_logit) if self.adaptive else torch.tensor(0.5)

    def forward(self, avg: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:
            return avg + max_
        return (0.5 + torch.sigmoid(self.alpha_logit)) * avg + (
            0.5 + torch.sigmoid(self.beta_logit)
        ) * max_


class SpatialGate(nn.Module):
    """CBAM's spatial gate: M_s = sigmoid(BN(conv_kxk([mean_c(F); max_c(F)]))), returns M_s * F.

    The conv has no bias (BN follows). The descriptor order is [mean; max]; with
    ``max_pool=False`` the descriptor is mean_c(F) alone (a one-channel conv).
    """

    def __init__(self, kernel_size: int = 7, max_pool: bool = True) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.max_pool = max_pool
        self.conv = nn.Conv2d(
            2 if max_pool else 1, 1, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=1, keepdim=True)
        if self.max_pool:
            pooled = torch.cat([pooled, channel_max(x)], dim=1)
        return torch.sigmoid(self.bn(self.conv(conv_input(pooled))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class SingleSampleSafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one sample.

    For N >= 2, or in eval mode, it is exactly ``nn.BatchNorm1d``. For N = 1 in training mode
    it computes what eval mode would and does not update the running statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)
