"""BAM: Bottleneck Attention Module (Park, Woo, Lee, Kweon, BMVC 2018, arXiv:1807.06514).

Equations (numbers as in Park et al.):
    F' = F + F * M(F)                                                   (Eq. 1)
    M(F) = sigmoid(M_c(F) + M_s(F)),  M_c: (N, C, 1, 1), M_s: (N, 1, H, W),
           both broadcast to (N, C, H, W)                               (Eq. 2)
    M_c(F) = BN(MLP(AvgPool(F))),  MLP: C -> C/r -> C                   (Eq. 3)
    M_s(F) = BN(f3_1x1(f2_3x3(f1_3x3(f0_1x1(F)))))                      (Eq. 4)
             f0: C -> C/r; f1, f2: C/r -> C/r, dilation d; f3: C/r -> 1
So F' = F * (1 + M(F)).

Defaults: r = 16, dilation d = 4 (the paper's choice after its ablation), hidden width
``max(1, C // r)``, and the layer layout of the official code (Jongchan/attention-module):
BN and ReLU on the MLP's hidden layer and after f0, f1 and f2, no BN at the branch outputs.
Every linear and conv layer has a bias. With ResNet-50's three modules (C = 256, 512, 1024)
this gives 25.92M parameters; BAM's and GAM's tables say 25.92M.

Where the paper and the official code differ, and what we do:
- The branches are combined as Eq. 2 says, sigmoid(M_c + M_s) (``combine="sum"``, the
  default). The official code (Jongchan/attention-module, ``MODELS/bam.py``) multiplies
  them, F * (1 + sigmoid(M_c * M_s)): ``combine="product"``.
- The official code pools the channel branch with ``avg_pool2d(F, H, stride=H)``, which on a
  non-square map averages only the left H x H square (and breaks for W >= 2H); we average
  the whole map, as the paper's AvgPool(F). On the square maps of the papers' networks the
  two agree, so no option reproduces that.
- Eqs. 3-4 put a BN at the *output* of each branch "to adjust the scale" of the two before
  they are added, and show no BN or activation inside the branches (Eq. 3 expands to
  BN(W1(W0 AvgPool(F) + b0) + b1)); the official code has BN + ReLU on every hidden layer
  and no output BN. The default follows the code; ``output_bn=True``
  adds the paper's output BNs too (BatchNorm1d(C) after the MLP, BatchNorm2d(1) after f3).
- Batch of one in training mode: BatchNorm1d cannot take batch statistics from one sample
  (PyTorch raises; the variance of one value is 0). The vector BNs here normalise a
  single-sample training batch with their running statistics instead, as in eval mode, and
  leave those statistics unchanged: one sample says nothing about the population, so the
  running estimate is the only statistic there is. Batches of two or more use batch
  statistics as usual. The spatial branch's BatchNorm2d needs no fix while H * W > 1.

Placement: the paper puts one BAM at each stage boundary of a network (where the feature
map is downsampled), not in every block, and so do the backbones by default
(``create_model("resnet50", attention="bam")`` is BAM's 25.92M network); ``placement=
"block"`` puts one in every block instead (30.77M on ResNet-50).
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import SingleSampleSafeBatchNorm1d, check_input, reduced_channels


@register_attention("bam", placement="stage")
class BAM(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        dilation: int = 4,
        output_bn: bool = False,
        combine: str = "sum",
    ) -> None:
        super().__init__()
        if combine not in ("sum", "product"):
            raise ValueError(
                f"combine must be 'sum' (Eq. 2) or 'product' (the code), got {combine!r}"
            )
        self.combine = combine
        if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
            raise ValueError(f"dilation must be a positive int, got {dilation!r}")
        hidden = reduced_channels(channels, reduction)
        self.channels = channels
        self.channel_mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            SingleSampleSafeBatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        self.channel_bn = SingleSampleSafeBatchNorm1d(channels) if output_bn else nn.Identity()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
        ]
        for _ in range(2):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(hidden, 1, 1))
        if output_bn:
            layers.append(nn.BatchNorm2d(1))
        self.spatial = nn.Sequential(*layers)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """M_c(F) before the sigmoid, shape (N, C, 1, 1)."""
        return self.channel_bn(self.channel_mlp(x.mean(dim=(2, 3)))).view(*x.shape[:2], 1, 1)

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """M_s(F) before the sigmoid, shape (N, 1, H, W)."""
        return self.spatial(x)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """M(F) = sigmoid(M_c(F) + M_s(F)) (or the code's product), shape (N, C, H, W)."""
        mc, ms = self.channel_attention(x), self.spatial_attention(x)
        return torch.sigmoid(mc + ms if self.combine == "sum" else mc * ms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "bam")
        return x * (1 + self.attention_map(x))
