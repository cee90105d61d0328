"""Spatial softmax attention of "Attention-Based Convolutional Neural Networks for Image
Classification" (Davis, Dean, Devin; the paper in our corpus, Sec. 3.1).

The paper gives no numbered equations; its Sec. 3.1 describes, for a feature map F
(C, H, W):
    logits = conv(F)                      "a set of convolutional filters" -> (1, H, W)
    a      = softmax over the H W positions of logits   "attention weights sum to one"
    F'     = a * F                        "multiplied element-wise", broadcast over channels
and F' goes on to the next convolutional layer.

Choices the paper leaves open, and ours:
- The filters: one conv C -> 1, so a single map is shared by all channels. The paper's
  "a set of attention maps" could also mean one map per channel; we do not offer that.
  The kernel size is not stated: ``kernel_size`` defaults to 3 ("same" padding, odd sizes
  only). The conv has no bias: softmax is unchanged by adding a constant, so a bias would
  never receive a gradient.
- Scale: weights that sum to one over H W positions have mean 1/(H W), so F' would shrink
  by about 1/1024 on a 32x32 map at every module. With ``scale_to_mean_one=True`` (default)
  the weights are multiplied by H W, so their mean is 1 and a uniform map leaves F
  unchanged; ``scale_to_mean_one=False`` is the literal "sum to one" weighting.
- Residual: the paper multiplies and passes the weighted maps on, with no x + a x term,
  so ``residual=False`` by default. ``residual=True`` gives F' = F + a * F = (1 + a) * F
  (the Residual Attention Network form), an option the paper does not describe.
- A 1x1 map is one position, whose softmax weight is 1: the module is then the identity
  (or doubles F with ``residual=True``).
- Mixed precision: the logits (the conv, the energies here) and the softmax run in float32
  with autocast off (``layers.conv_softmax``); the weights are then cast to the input's dtype.

Placement: Sec. 3.1 adds attention modules "after certain convolutional layers", while
Sec. 7.2 says the approach "currently uses a single attention module at the end of the
network". Placement is a model option, not part of this module; inside our backbones the
module sits wherever the backbone puts attention (every residual block for CIFAR ResNets).
The paper is also inconsistent elsewhere (Sec. 7.2 calls the mechanism "based on a global
average pooling operation" and "a fixed attention map"); we follow Sec. 3.1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, conv_softmax


@register_attention("spatial_softmax")
class SpatialSoftmaxAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        scale_to_mean_one: bool = True,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 1
            or kernel_size % 2 == 0
        ):
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        for name, value in (("scale_to_mean_one", scale_to_mean_one), ("residual", residual)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.channels = channels
        self.scale_to_mean_one = scale_to_mean_one
        self.residual = residual
        self.conv = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """a, shape (N, 1, H, W): sums to 1 over positions (to H W if scaled)."""
        n, _, height, width = x.shape
        weights = conv_softmax(self.conv, x, dim=-1)  # (N, 1, H W)
        if self.scale_to_mean_one:
            weights = weights * (height * width)
        return weights.view(n, 1, height, width).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "spatial_softmax")
        weighted = x * self.attention_map(x)
        return x + weighted if self.residual else weighted
