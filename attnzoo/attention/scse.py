"""scSE: concurrent spatial and channel squeeze & excitation (Roy, Navab, Wachinger,
"Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks",
MICCAI 2018, arXiv:1803.02579; journal version "Recalibrating Fully Convolutional Networks with
Spatial and Channel 'Squeeze & Excitation' Blocks", IEEE TMI 38(2), 2019, arXiv:1808.08127;
official code ai-med/squeeze_and_excitation, ``ChannelSpatialSELayer``).

Two gates computed side by side from the same U (N, C, H, W):

    cSE (spatial squeeze, channel excitation), an SE gate:
        z_c   = 1/(H W) sum_{i,j} u_c(i, j)
        z^    = sigmoid(W_1 relu(W_2 z)),  W_2: C -> C/r, W_1: C/r -> C (both with bias)
        U_cSE = [z^_1 u_1, ..., z^_C u_C]
    sSE (channel squeeze, spatial excitation):
        q         = W_sq * U + b             a 1x1 conv C -> 1, one value per position
        U_sSE(i,j) = sigmoid(q(i, j)) u(i, j)
    scSE:
        U_scSE = U_cSE + U_sSE               (``combine="add"``, the MICCAI paper)
        U_scSE = max(U_cSE, U_sSE)           (``combine="max"``, element-wise: the official
                                              code's choice, the journal version's "max-out")

Choices:
- ``reduction`` r = 2 by default, the MICCAI paper's C/2 bottleneck and the official code's
  ``reduction_ratio=2``; hidden width max(1, C // r) (the code's C // r, never 0).
- ``combine="add"`` is the default, as the MICCAI paper defines scSE; the official code (and
  so most reproductions) takes the element-wise maximum instead. The journal version compares
  further aggregations (multiplication, concatenation); we could not check their exact form
  against its text, so they are not offered (concatenation would also double the channels,
  which a C -> C module cannot).
- Both FCs and the 1x1 conv have biases, as in the official code (C(C/r) + C/r + (C/r)C + C
  + C + 1 parameters).
- Placement: in every residual block (the papers put it after each encoder/decoder block of
  their segmentation networks).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, reduced_channels

COMBINES = ("add", "max")


@register_attention("scse")
class ConcurrentSpatialChannelSE(nn.Module):
    def __init__(self, channels: int, reduction: float = 2, combine: str = "add") -> None:
        super().__init__()
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        hidden = reduced_channels(channels, reduction)
        self.channels = channels
        self.combine = combine
        self.channel_fc1 = nn.Conv2d(channels, hidden, 1)  # W_2 above, C -> C/r
        self.channel_fc2 = nn.Conv2d(hidden, channels, 1)  # W_1 above, C/r -> C
        self.spatial_conv = nn.Conv2d(channels, 1, 1)

    def channel_gate(self, x: torch.Tensor) -> torch.Tensor:
        """cSE's z^, shape (N, C, 1, 1)."""
        z = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.channel_fc2(torch.relu(self.channel_fc1(z))))

    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """sSE's sigmoid(q), shape (N, 1, H, W)."""
        return torch.sigmoid(self.spatial_conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "scse")
        by_channel = x * self.channel_gate(x).to(x.dtype)
        by_position = x * self.spatial_gate(x).to(x.dtype)
        if self.combine == "add":
            return by_channel + by_position
        return torch.maximum(by_channel, by_position)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"
