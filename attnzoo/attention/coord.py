"""Coordinate Attention (Hou et al., "Coordinate Attention for Efficient Mobile Network
Design", CVPR 2021, arXiv:2103.02907; official code houqb/CoordAttention, ``coordatt.py``).

Channel attention that keeps one spatial direction. For X (N, C, H, W):

    z^h_c(h) = 1/W sum_w X_c(h, w)           pooled along the width   (N, C, H, 1)
    z^w_c(w) = 1/H sum_h X_c(h, w)           pooled along the height  (N, C, 1, W)
    f        = delta(BN(F_1([z^h; z^w])))    one shared 1x1 conv C -> C', over the H + W
                                             positions of the two descriptors side by side
    g^h      = sigmoid(F_h(f^h)),  g^w = sigmoid(F_w(f^w))    1x1 convs C' -> C
    Y_c(h, w) = X_c(h, w) g^h_c(h) g^w_c(w)

Choices, with the official code:
- C' = max(8, C // r), r = 32 (``reduction``, ``min_hidden``), as in ``coordatt.py``.
- delta is h-swish, x * ReLU6(x + 3) / 6 (``activation="hswish"``, the code's; "relu" is
  the plain alternative). All three 1x1 convs have biases, and BN follows F_1 (so F_1's
  bias learns nothing in training mode, as in the code: the batch mean removes it).
- The BN normalises over the batch and the H + W positions of both descriptors together
  (they are one tensor in the code).
- Placement: in every residual block, as SE (the paper inserts it in MobileNetV2's and
  MobileNeXt's blocks; where inside a block is a backbone matter, see docs/params.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input

ACTIVATIONS = ("hswish", "relu")


@register_attention("coord")
class CoordAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 32,
        min_hidden: int = 8,
        activation: str = "hswish",
    ) -> None:
        super().__init__()
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        if isinstance(min_hidden, bool) or not isinstance(min_hidden, int) or min_hidden < 1:
            raise ValueError(f"min_hidden must be a positive int, got {min_hidden!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        hidden = max(min_hidden, int(channels // reduction))
        self.channels = channels
        self.activation = activation
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_h = nn.Conv2d(hidden, channels, 1)
        self.conv_w = nn.Conv2d(hidden, channels, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g^h, g^w): shapes (N, C, H, 1) and (N, C, 1, W)."""
        h, w = x.shape[2], x.shape[3]
        z_h = x.mean(dim=3, keepdim=True)  # (N, C, H, 1)
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        f = self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2)))
        f = F.hardswish(f) if self.activation == "hswish" else F.relu(f)
        f_h, f_w = f.split([h, w], dim=2)
        return torch.sigmoid(self.conv_h(f_h)), torch.sigmoid(self.conv_w(f_w.transpose(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "coord")
        g_h, g_w = self.gates(x)
        return x * g_h * g_w
