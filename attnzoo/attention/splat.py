"""Split attention, the convolution of ResNeSt (Zhang, Wu, Zhang, Zhu, Lin, Zhang, Sun, He,
Mueller, Manmatha, Li, Smola, "ResNeSt: Split-Attention Networks", CVPR Workshops 2022,
arXiv:2004.08955; official code zhanghang1989/ResNeSt, ``splat.py``).

A conv-level module: it replaces a block's 3x3 convolution (C_in -> C, stride s). One grouped
3x3 conv (K cardinal groups x R radix splits, BN, ReLU) gives R x K feature-map groups
U_{R(k-1)+i}, each C / K channels. For each cardinal group k:

    U^k   = sum_{i=1..R} U_{R(k-1)+i}                                      (Eq. 1)
    s^k_c = 1/(H W) sum_{h,w} U^k_c(h, w)                                  (Eq. 2)
    a^k_i(c) = exp(G^c_i(s^k)) / sum_j exp(G^c_j(s^k))   if R > 1
             = sigmoid(G^c_i(s^k))                        if R = 1          (Eq. 3)
    V^k_c = sum_i a^k_i(c) U_{R(k-1)+i, c}                                  (Eq. 4)
    V     = [V^1; ...; V^K]

G is two 1x1 convs grouped by cardinality, C -> d -> R C, with BN and ReLU between
(Sec. 3.1: "two fully connected layers with ReLU").

Choices, as the official code (so that its checkpoints' tensors fit):
- d = max(C_in R / 4, 32) (``reduction=4``, ``min_hidden=32``).
- Both FCs have biases; the first one's is followed by BN and so learns nothing in training.
- Channel layout: the conv's output is R blocks of C channels (radix split i is channels
  i C ... (i + 1) C - 1, cardinal group k inside it), and the second FC's output is K blocks
  of (R, C / K): what the official ``rSoftMax`` reshapes.
- The softmax over the R splits runs in float32 under autocast; a training batch of one
  uses the first FC's BN running statistics.
- ResNeSt-50 also changes the network around the blocks (a deep 3x3 stem, average-pool
  downsampling in the blocks and shortcuts, "ResNet-D"); those are backbone tweaks, not the
  split attention, and ours keep the plain ResNet stem and strided conv (docs/params.md).
- Built with ``create_attention("splat", C)`` it maps C -> C at stride 1, radix 2.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import SingleSampleSafeBatchNorm1d, check_input, softmax_float32


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@register_attention("splat", level="conv")
class SplitAttentionConv(nn.Module):
    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        groups: int = 1,
        radix: int = 2,
        reduction: float = 4,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        for name, value in (
            ("out_channels", out_channels), ("stride", stride), ("groups", groups),
            ("radix", radix), ("min_hidden", min_hidden),
        ):  # fmt: skip
            _positive_int(name, value)
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide channels={channels} and out_channels={out_channels}"
            )
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        self.radix = radix
        hidden = max(int(channels * radix // reduction), min_hidden)
        hidden += -hidden % groups  # the grouped FCs need a multiple of the cardinality
        self.conv = nn.Conv2d(
            channels, out_channels * radix, 3, stride, 1, groups=groups * radix, bias=False
        )
        self.bn0 = nn.BatchNorm2d(out_channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, hidden, 1, groups=groups)
        self.bn1 = SingleSampleSafeBatchNorm1d(hidden)
        self.fc2 = nn.Conv2d(hidden, out_channels * radix, 1, groups=groups)

    def split_weights(self, splits: torch.Tensor) -> torch.Tensor:
        """a_i(c) (Eq. 3) from the radix splits (N, R, C, H, W): shape (N, R, C, 1, 1)."""
        n = splits.shape[0]
        s = splits.sum(dim=1).mean(dim=(2, 3), keepdim=True)  # Eqs. 1-2, (N, C, 1, 1)
        z = self.relu(self.bn1(self.fc1(s).flatten(1))).view(n, -1, 1, 1)
        logits = self.fc2(z).view(n, self.groups, self.radix, -1).transpose(1, 2)  # (N, R, K, C/K)
        if self.radix == 1:
            weights = torch.sigmoid(logits)
        else:
            weights = softmax_float32(logits, 1)
        return weights.reshape(n, self.radix, self.out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "splat")
        u = self.relu(self.bn0(self.conv(x)))
        n, _, h, w = u.shape
        splits = u.view(n, self.radix, self.out_channels, h, w)
        return (splits * self.split_weights(splits)).sum(dim=1)  # Eq. 4

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, stride={self.stride}, "
            f"groups={self.groups}, radix={self.radix}"
        )
