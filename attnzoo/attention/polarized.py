"""PSA: polarized self-attention (Liu, Liu, Fan, Huang, "Polarized Self-Attention: Towards
High-quality Pixel-wise Regression", arXiv:2107.00782, 2021; official code DeLightCMU/PSA,
``semantic-segmentation/network/PSA.py``).

Two branches, each collapsing one axis completely while keeping the other at full
resolution, each normalised by a softmax and tone-mapped by a sigmoid. For X (N, C, H, W),
with "x" a matrix product and all W 1x1 convs:

Channel-only branch, a weight per channel A^ch (C, 1, 1):
    A^ch(X) = sigmoid(LN(W_z(W_v(X) x softmax_HW(W_q(X)))))
      W_q: C -> 1 (softmax over the HW positions), W_v: C -> C/2, W_z: C/2 -> C,
      LN: a LayerNorm over the C values.
    Z^ch = A^ch (.)ch X                      channel-wise multiplication

Spatial-only branch, a weight per position A^sp (1, H, W):
    A^sp(X) = sigmoid(softmax_C/2(GAP(W_q(X)))^T x W_v(X))
      W_q, W_v: C -> C/2, GAP global average pooling, the softmax over the C/2 channels.
    Z^sp = A^sp (.)sp X                      spatial-wise multiplication

Layouts (``layout``):
    "parallel" (default, PSA_p):   out = Z^ch + Z^sp = A^ch X + A^sp X
    "sequential" (PSA_s):          Y = A^ch(X) X,  out = A^sp(Y) Y

Choices, and where the official code differs from the paper (we follow the paper):
- The official code names the branches the other way round (its ``spatial_pool`` is the
  channel-only branch; DeLightCMU/PSA issue #5).
- Spatial-only softmax: the code's PSA_p applies no softmax to the pooled query and instead
  takes a softmax over the HW positions after the product (before the sigmoid); its PSA_s
  takes the softmax over the HW positions of W_v(X), channel by channel. The paper
  normalises the pooled query over its C/2 channels; so do we.
- LayerNorm: the paper's channel-only branch normalises W_z's output (C values) before the
  sigmoid. The code's PSA_p has no LayerNorm at all (W_z then sigmoid); its PSA_s replaces
  W_z by a bottleneck C/2 -> C/8 -> LN -> ReLU -> C. We use one LayerNorm over C values,
  with an affine scale and shift (C each), in both layouts.
- No conv has a bias, as in the official code (the paper does not say). A bias on the
  channel-only W_q would be ignored by its softmax over positions anyway.
- C/2 is ``max(1, C // 2)``.
- The same convs serve both layouts; "sequential" applies the spatial-only branch to Y.
- Computed in an equivalent, cheaper order (no C/2-wide full-size maps): W_v(X) x p =
  W_v(X p) for weights p that sum to 1 (a 1x1 conv without bias is linear), so the
  channel-only branch pools X first; GAP(W_q(X)) = W_q(GAP(X)); and s^T W_v(X) =
  (s^T W_v) X, a per-sample C-vector applied to X.
- The softmaxes and their logits (the two W_q) run in float32 (at least) with autocast off
  (``layers.conv_softmax``), whatever the input's dtype.
- A third-party version (xmu-xiaoma666/External-Attention-pytorch, issue #19) first left
  out the spatial-only softmax and added Z^ch to the sequential output; both since fixed.
- Placement: in every residual block (``placement="block"``, after the block's last BN, as
  SE). The paper evaluates PSA in pose-estimation and segmentation networks (the official
  README's models are HRNet-W48 and HRNetV2-OCR) and has no ImageNet classification model.
  The module has 2 C^2 + 3 C parameters (for even C), so ResNet-50 with one in every block
  has 65,841,448 parameters (2.6x the plain 25,557,032); at the stage boundaries 28,314,920.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, conv_softmax

LAYOUTS = ("parallel", "sequential")


@register_attention("polarized")
class PolarizedSelfAttention(nn.Module):
    def __init__(self, channels: int, layout: str = "parallel") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        inner = max(1, channels // 2)
        self.channels = channels
        self.layout = layout
        # Channel-only branch.
        self.channel_query = nn.Conv2d(channels, 1, 1, bias=False)  # W_q
        self.channel_value = nn.Conv2d(channels, inner, 1, bias=False)  # W_v
        self.channel_out = nn.Conv2d(inner, channels, 1, bias=False)  # W_z
        self.channel_norm = nn.LayerNorm([channels, 1, 1])
        # Spatial-only branch.
        self.spatial_query = nn.Conv2d(channels, inner, 1, bias=False)  # W_q
        self.spatial_value = nn.Conv2d(channels, inner, 1, bias=False)  # W_v

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """A^ch, shape (N, C, 1, 1)."""
        n, c = x.shape[:2]
        weights = conv_softmax(self.channel_query, x, dim=-1)  # (N, 1, HW)
        pooled = torch.bmm(x.flatten(2), weights.to(x.dtype).transpose(1, 2))  # X p (N, C, 1)
        z = self.channel_out(self.channel_value(pooled.view(n, c, 1, 1)))
        return torch.sigmoid(self.channel_norm(z))

    def spatial_weights(self, x: torch.Tensor) -> torch.Tensor:
        """A^sp, shape (N, 1, H, W)."""
        n, c, h, w = x.shape
        pooled = x.mean(dim=(2, 3), keepdim=True)
        s = conv_softmax(self.spatial_query, pooled, dim=1, start_dim=1).to(x.dtype)  # (N, C/2)
        value_weight = self.spatial_value.weight.flatten(1).to(s.dtype)  # (C/2, C)
        per_channel = (s @ value_weight).unsqueeze(1)  # s^T W_v, (N, 1, C)
        return torch.sigmoid(torch.bmm(per_channel, x.flatten(2))).view(n, 1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "polarized")
        if self.layout == "parallel":
            return x * (self.channel_weights(x) + self.spatial_weights(x))
        y = x * self.channel_weights(x)
        return y * self.spatial_weights(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, layout={self.layout!r}"
