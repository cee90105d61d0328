"""A^2: the double attention block (Chen, Kalantidis, Li, Yan, Feng, "A^2-Nets: Double
Attention Networks", NeurIPS 2018, arXiv:1810.11579).

Global features are gathered into a small set of descriptors by one attention and handed
back to every position by another. For X (N, C, H, W) with positions i = 1 .. HW and three
1x1 convs of X:

    A = conv_A(X)   (c_m, HW)   the features to gather
    B = conv_B(X)   (c_n, HW)   n attention maps; b_j = softmax over the HW positions of row j
    V = conv_V(X)   (c_n, HW)   attention vectors; v_i = softmax over the c_n channels at i

    G = A softmax(B)^T,  G = [g_1 .. g_n],  g_j = sum_i A_i b_ji     gathering (second-order
                                                                     attention pooling)
    Z_i = G v_i = sum_j v_ji g_j                                     distribution
    out = X + conv_out(Z)                                            conv_out: c_m -> C

(the paper's gathering and distribution steps, Sec. 3.1-3.3, and its double attention
block, whose 1x1 conv restores the C channels before the residual addition.)

Choices (we could read the paper's abstract here but not its full text, so the choices
marked "unchecked" may be settled there):
- c_m = C / ``feature_reduction`` and c_n = C / ``descriptor_reduction``, both 4 by default,
  as ``max(1, int(C // r))``. We could not check the widths the paper's ImageNet and Kinetics
  models use (the authors released no code, as far as we could find); C / 4 is our default,
  not a value taken from the paper (unchecked).
- All four convs have biases (unchecked). conv_B's bias is added to every
  logit of a softmax over positions, which ignores it: its gradient is zero.
- conv_out starts with PyTorch's default init, so the block does not start as the identity
  (unchecked).
- The two softmaxes and their logits (conv_B, conv_V) run in float32 (at least) with
  autocast off (``layers.conv_softmax``), whatever the input's dtype; the products run in
  the input's (or autocast's) dtype.
- Differences in a popular third-party version (xmu-xiaoma666/External-Attention-pytorch,
  ``A2Atttention.py``): it normalises the gathering maps B over the c_n channels instead of
  over the positions, and returns conv_out(Z) without the residual addition. We follow the
  paper on both.
- Placement: ``stage`` by default (one block after each stage but the last). We could not
  check how many blocks the paper's ResNet-50 has and where, but the abstract bounds it:
  its A^2 ResNet-50 has over 40% fewer parameters than ResNet-152 (60.2M), so under
  36.1M. With this module in every residual block (``placement="block"``, C/4 widths)
  ResNet-50 has 45.7M parameters, over that bound; at the stage boundaries, 26.9M. So the
  paper inserts a few blocks, not one per residual block, and the stage boundaries are the
  nearest fixed placement here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, conv_softmax


def _check_reduction(name: str, value: object) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not value > 0
        or not math.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@register_attention("a2", placement="stage")
class DoubleAttention(nn.Module):
    def __init__(
        self, channels: int, feature_reduction: float = 4, descriptor_reduction: float = 4
    ) -> None:
        super().__init__()
        _check_reduction("feature_reduction", feature_reduction)
        _check_reduction("descriptor_reduction", descriptor_reduction)
        feature_channels = max(1, int(channels // feature_reduction))  # c_m
        descriptors = max(1, int(channels // descriptor_reduction))  # c_n
        self.channels = channels
        self.feature_conv = nn.Conv2d(channels, feature_channels, 1)  # A
        self.gather_conv = nn.Conv2d(channels, descriptors, 1)  # B
        self.distribute_conv = nn.Conv2d(channels, descriptors, 1)  # V
        self.out_conv = nn.Conv2d(feature_channels, channels, 1)

    def double_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Z, shape (N, c_m, H, W)."""
        n, _, h, w = x.shape
        features = self.feature_conv(x).flatten(2)  # A (N, c_m, HW)
        dtype = features.dtype
        gather_maps = conv_softmax(self.gather_conv, x, dim=2).to(dtype)  # (N, c_n, HW)
        vectors = conv_softmax(self.distribute_conv, x, dim=1).to(dtype)  # (N, c_n, HW)
        descriptors = torch.bmm(features, gather_maps.transpose(1, 2))  # G (N, c_m, c_n)
        return torch.bmm(descriptors, vectors).view(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "a2")
        return x + self.out_conv(self.double_attention(x))
