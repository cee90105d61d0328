"""Selective Kernel convolution (Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019,
arXiv:1903.06586; official code implus/SKNet, in Caffe).

A conv-level module: it *replaces* a block's 3x3 convolution (C_in -> C_out, stride s), and
lets each channel choose between receptive fields. With M = 2 branches (the paper's
SK[M=2, G=32, r=16]):

    split:   U_m = ReLU(BN(conv_m(X)))        conv_1: 3x3; conv_2: 3x3 with dilation 2 (the
                                              paper's 5x5 "replaced by a dilated 3x3"); both
                                              grouped (G), stride s
    fuse:    U = sum_m U_m                                        (Eq. 1)
             s_c = 1/(H W) sum_{i,j} U_c(i, j)                    (Eq. 2)
             z = ReLU(BN(W s)),  W: d x C_out                      (Eq. 3)
             d = max(C_out / r, L),  r = 16, L = 32                (Eq. 4)
    select:  a_{m,c} = exp(A_{m,c} z) / sum_k exp(A_{k,c} z)        (Eq. 5, softmax over the
                                                                   branches, per channel)
             V_c = sum_m a_{m,c} U_{m,c}                           (Eq. 6)

Choices:
- ``kernels=(3, 5)``: the receptive fields, each a 3x3 conv with dilation (k - 1) / 2, as the
  paper does (``kernels=(3, 5, 7)`` is M = 3). ``groups`` comes from the backbone (32 in
  SKNet-50, which is ResNeXt-50 32x4d with its 3x3 convs replaced: ``create_model(
  "resnext50_32x4d", attention="sk")``; 1 in a plain ResNet-50, as timm's skresnet50).
- W and the A_m have no biases (Eqs. 3 and 5 have none; a bias before BN would learn nothing).
- The softmax over branches runs in float32 under autocast. The BN of Eq. 3 falls back to
  its running statistics for a training batch of one (one value per channel).
- The output is V, already after BN and ReLU: the backbone drops the BN that followed the
  replaced conv (Bottleneck: ``bn2``; BasicBlock: ``bn1``, whose conv1 SK replaces, as timm).
- Built with ``create_attention("sk", C)`` it maps C -> C at stride 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import SingleSampleSafeBatchNorm1d, check_input, softmax_float32


@register_attention("sk", level="conv")
class SelectiveKernel(nn.Module):
    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        groups: int = 1,
        kernels: tuple[int, ...] = (3, 5),
        reduction: float = 16,
        min_hidden: int = 32,
    ) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        kernels = tuple(kernels) if isinstance(kernels, (list, tuple)) else kernels
        if (
            not isinstance(kernels, tuple)
            or len(kernels) < 2
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 3 or k % 2 == 0
                   for k in kernels)
        ):  # fmt: skip
            raise ValueError(f"kernels must be two or more odd ints >= 3, got {kernels!r}")
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        if isinstance(min_hidden, bool) or not isinstance(min_hidden, int) or min_hidden < 1:
            raise ValueError(f"min_hidden must be a positive int, got {min_hidden!r}")
        for name, value in (("out_channels", out_channels), ("stride", stride), ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide channels={channels} and out_channels={out_channels}"
            )
        self.channels = channels
        self.out_channels = out_channels
        self.stride = stride
        self.kernels = kernels
        hidden = max(int(out_channels // reduction), min_hidden)
        self.branches = nn.ModuleList()
        for k in kernels:
            dilation = (k - 1) // 2
            self.branches.append(
                nn.Sequential(
                    nn.Conv2d(
                        channels, out_channels, 3, stride, dilation, dilation, groups, bias=False
                    ),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
            )
        self.fuse = nn.Sequential(  # z = ReLU(BN(W s)), Eq. 3
            nn.Linear(out_channels, hidden, bias=False),
            SingleSampleSafeBatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        )
        self.select = nn.Linear(hidden, out_channels * len(kernels), bias=False)  # the A_m

    def branch_weights(self, maps: torch.Tensor) -> torch.Tensor:
        """a_{m,c} (Eq. 5) from the stacked branch outputs ``maps`` (N, M, C, H, W):
        shape (N, M, C, 1, 1), summing to 1 over M."""
        s = maps.sum(dim=1).mean(dim=(2, 3))  # Eqs. 1-2, (N, C)
        logits = self.select(self.fuse(s))
        n = logits.shape[0]
        return softmax_float32(logits.view(n, len(self.kernels), self.out_channels, 1, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "sk")
        maps = torch.stack([branch(x) for branch in self.branches], dim=1)
        return (maps * self.branch_weights(maps)).sum(dim=1)  # Eq. 6

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, out_channels={self.out_channels}, "
            f"stride={self.stride}, kernels={self.kernels}"
        )
