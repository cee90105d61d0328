"""GC: the global context block (Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV Workshops 2019, arXiv:1904.11492; official
code xvjiarui/GCNet, ``mmdet/ops/ct/context_block.py``, also in mmcv as ``ContextBlock``).

A simplified non-local block: one query-independent attention map pools the whole map into a
context vector, a bottleneck transforms it, and the result is added to every position. For
x (N, C, H, W) with positions j = 1 .. N_p = H W (the GC block, the paper's Sec. 4):

    alpha_j = exp(W_k x_j) / sum_m exp(W_k x_m)       context modelling: W_k a 1x1 conv C -> 1,
    c       = sum_j alpha_j x_j                       a softmax over the positions  (C,)
    t       = W_v2 ReLU(LN(W_v1 c))                   transform: W_v1 C -> C/r, LayerNorm over
                                                      the C/r values, W_v2 C/r -> C
    z_i     = x_i + t                                 fusion: broadcast addition

Options (the pooling and fusion ablations of the paper's Sec. 5, the code's ``pool`` and
``fusions``):
- ``pooling``: "att" (default, the attention pooling above) or "avg" (c = the mean of x over
  the positions, SE's squeeze).
- ``fusion``: "add" (default, z = x + t) or "mul" (z = x * sigmoid(t), SE's scaling).

Choices, with the official code:
- r = 16 (``reduction``; the paper's GC r16, its default). The code's width is
  ``int(C * ratio)``; ours is ``max(min_hidden, int(C // reduction))`` with ``min_hidden = 8``,
  our addition: a LayerNorm over a single value outputs its bias whatever the input (x - mean
  is 0), so with C / r = 1 (C = 16 on a CIFAR ResNet) the context would never reach the
  output, and over two values it outputs +-1. On ResNet-50 (C >= 256) the minimum never
  applies, so the widths are the paper's.
- All three 1x1 convs have biases, as in the code. The bias of W_k is added to every logit
  of the softmax over positions, which ignores it: it never changes the output and its
  gradient is zero.
- W_v2 starts at zero (weight and bias), as in the code (``last_zero_init``): with "add" the
  block starts as the identity, with "mul" as x / 2. W_k starts with PyTorch's default init
  (the code uses Kaiming fan-in); the other layers too.
- The LayerNorm has an affine scale and shift over its C/r values, as in the code.
- The logits W_k x (the energies) and the softmax run in float32 (at least) with autocast off
  (``layers.conv_softmax``), whatever the input's dtype; the weights are then cast to the
  input's dtype for the pooling.
- Placement: in every residual block (the backbone's ``placement="block"``), after the
  block's last BN and before the addition with the shortcut, which is where the official
  code puts it by default (``insert_pos="after_1x1"``). The official detection models put
  GC only in stages c3-c5 (README: "GC(c3-c5, r16)"; the backbone's ``stage_with_ct``); here
  the block placement covers every stage, c2 included (ResNet-50: 16 modules, not 13).
  ResNet-50 + GC r16 has 28,105,032 parameters so; without c2's three modules (c3-c5 only)
  28,078,773, i.e. 28.08M.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, conv_softmax

POOLINGS = ("att", "avg")
FUSIONS = ("add", "mul")


@register_attention("gc")
class GlobalContextBlock(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        min_hidden: int = 8,
        pooling: str = "att",
        fusion: str = "add",
    ) -> None:
        super().__init__()
        if (
            not isinstance(reduction, (int, float))
            or isinstance(reduction, bool)
            or not reduction > 0
            or not math.isfinite(reduction)
        ):
            raise ValueError(f"reduction must be a finite number > 0, got {reduction!r}")
        if isinstance(min_hidden, bool) or not isinstance(min_hidden, int) or min_hidden < 1:
            raise ValueError(f"min_hidden must be a positive int, got {min_hidden!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        hidden = max(min_hidden, int(channels // reduction))
        self.channels = channels
        self.pooling = pooling
        self.fusion = fusion
        if pooling == "att":
            self.context_conv = nn.Conv2d(channels, 1, 1)  # W_k
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),  # W_v1
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),  # W_v2
        )
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled context c, shape (N, C, 1, 1)."""
        if self.pooling == "avg":
            return x.mean(dim=(2, 3), keepdim=True)
        n, c = x.shape[:2]
        weights = conv_softmax(self.context_conv, x, dim=-1)  # (N, 1, HW)
        # (N, C, HW) @ (N, HW, 1): flatten(2) is a view in both the NCHW and NHWC layouts.
        pooled = torch.bmm(x.flatten(2), weights.to(x.dtype).transpose(1, 2))
        return pooled.view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "gc")
        transformed = self.transform(self.context(x))  # (N, C, 1, 1)
        if self.fusion == "add":
            return x + transformed
        return x * torch.sigmoid(transformed)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pooling={self.pooling!r}, fusion={self.fusion!r}"
