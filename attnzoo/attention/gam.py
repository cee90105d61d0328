"""GAM: Global Attention Mechanism (Liu, Shao, Hoffmann, "Global Attention Mechanism: Retain
Information to Enhance Channel-Spatial Interactions", 2021; the paper in ../shared/papers).

Sequential channel-then-spatial refinement, as in CBAM (GAM Eqs. 1-2):
    F2 = M_c(F1) * F1                                                   (Eq. 1)
    F3 = M_s(F2) * F2                                                   (Eq. 2)

Channel submodule (GAM Fig. 2; the paper writes no equation for it): a 3-D permutation
(N, C, H, W) -> (N, H, W, C), so that a two-layer MLP acts on the C-vector of every pixel
(no pooling), the reverse permutation, and a sigmoid:
    M_c(F) = sigmoid(P^-1(W2 ReLU(W1 P(F) + b1) + b2)),   W1: C -> C/r,  W2: C/r -> C
Spatial submodule (GAM Fig. 3): two 7x7 convolutions and no pooling:
    M_s(F) = sigmoid(BN(conv7x7_{C/r -> C}(S(ReLU(BN(conv7x7_{C -> C/r}(F)))))))
S is the channel shuffle (the identity unless ``groups`` > 1). Both maps are (N, C, H, W).

Defaults, and the choices the paper leaves open:
- ``reduction`` r = 16, hidden width ``max(1, C // r)``. The paper names r ("same as BAM")
  but gives no value. The tables settle it. With GAM after the last BN of every ResNet-50
  bottleneck (C = 256 x3, 512 x4, 1024 x6, 2048 x3), r = 16 gives GAM's FLOPs exactly:
  4.11G + 20.55G = 24.66G (Table 2: 24.66G); 9.56G with ``groups=4`` (9.56G); on CIFAR
  1.3G + 6.71G = 8.01G (Table 1: 8.02G). r = 4, the value in the widely copied GitHub code,
  gives 86.3G and 526.8M parameters.
- Parameter totals, ours (defaults) vs the paper: ResNet-50 CIFAR-100 149.52M vs 149.47M;
  ``groups=4`` 57.10M vs 57.05M; ImageNet 151.37M vs 151.32M; ``groups=4`` 58.94M vs
  58.9M; ResNet-18 16.05M vs 16.04M (Table 4, without max-pooling: 16.05M); channel only
  11.78M vs 11.78M; spatial only 15.96M vs 15.95M. Almost all of the 0.01-0.05M gap is the
  per-channel terms after the second conv (its bias and BN, 3C per module). With
  ``conv_bias=False, out_bn=False`` (conv2 feeds the sigmoid directly) all seven rows of
  Tables 1-3 match to the paper's 0.01M, provided the CIFAR ResNet-50 has the 3x3 CIFAR
  stem (its 1.3G FLOPs at 32x32 say it has; with torchvision's 7x7 stem the CIFAR row
  without groups comes out at 149.48M). Of the 64 bias/BN layouts we counted (bias or not
  on each of the MLP and the two convs, BN or not after each conv), the only exact ones
  have neither a bias nor a BN after conv2, and every layout with a BN after conv2
  matches at most one of the seven rows. We keep BN after both convs and all biases as the
  default (the widely used structure, and what this library's spec asks for);
  ``out_bn=False, conv_bias=False`` is the structure that the parameter columns imply.
- ``conv_bias=True``: both 7x7 convs have biases (``nn.Conv2d``'s default). A bias right
  before a BN gets no gradient in training mode and changes nothing; it is there only so
  that the parameter count is that of the common code. The MLP always has biases.
- ``groups`` = 1. ``groups=4`` is the paper's "GAM (gc)" (Table 1 footnote: "we set its
  hyper-parameter as 4"): both 7x7 convs are group convs, and a channel shuffle (Zhang et al.,
  ShuffleNet, CVPR 2018) comes right after the first group conv's BN and ReLU, before the
  second conv: conv1 -> BN -> ReLU -> shuffle -> conv2 -> BN -> sigmoid. That is where a
  ShuffleNet unit shuffles. We do not shuffle after conv2: that would only relabel which
  map gates which channel. ``groups`` must divide both C and C // r. How much the groups
  mix depends on the hidden width: with C // r >= groups**2 every output channel of conv2
  depends on every input group (the paper's ResNet-50: C // r = 16, 32, 64, 128 with
  groups = 4); with fewer hidden channels the mixing is partial, and with one hidden
  channel per group (C // r == groups, e.g. C = 64, r = 16, groups = 4) the shuffle is the
  identity and the groups never mix.
- The channel sigmoid is kept: Fig. 2 has it. The widely copied GitHub code drops it, which
  multiplies F1 by an unbounded MLP output.
- ``pool=False``. The paper removes pooling from the spatial submodule ("max-pooling reduces
  the information and contributes negatively") and mentions pooling only for ImageNet,
  where it keeps "the use of max-pooling in the spatial attention submodule" from CBAM and
  "switch[es] the first stride of the first block from 1 to 2 in order to match the size
  of the features"; it gives no kernel, stride or position. The tables
  constrain it: with pooling (Table 2: 16.04M, 2.45G) and without (Table 4 "wmp": 16.05M,
  2.47G) agree to within rounding, and 2.45G is what 7x7 convs at full resolution cost. So
  the pooling adds no parameters and the convs are not run on a downsampled map. CBAM-style
  channel pooling ([max_c; mean_c] into the first conv) would remove 2.1M parameters from
  ResNet-18 + GAM, and a stride-2 pool before the convs would drop its FLOPs to 1.99G; the
  tables rule out both. Our reading, ``pool=True``: a 3x3 max-pool with stride 1 and
  padding 1 on the spatial submodule's input, M_s(maxpool(F2)), and F3 = M_s * F2. It keeps
  the feature size and adds no parameters. The stride change is not implemented because
  the tables rule it out: in a torchvision ResNet the first block (layer1's) has stride 1,
  and a stride of 2 there would run every later stage on a quarter of the positions,
  about a quarter of the backbone's MACs, while every ImageNet row of Tables 2-4 matches
  the full-resolution count (ResNet-18 1.82G, ours 1.814G; ResNet-50 + GAM 24.66G, ours
  24.64G; docs/params.md). Whatever the sentence meant, the networks the tables measured
  did not have it.
- ``channel=False`` / ``spatial=False`` drop a submodule: Table 3's "GAM (sp)" and
  "GAM (ch)" rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input, reduced_channels


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: view C as (groups, C / groups), transpose, flatten.

    Output channel ``j * groups + g`` is input channel ``g * (C / groups) + j``: the input
    groups are dealt out in turn, so each group of the next group conv gets channels from
    as many groups of the previous one as it has channels (up to all of them).
    """
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@register_attention("gam")
class GAM(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        groups: int = 1,
        pool: bool = False,
        channel: bool = True,
        spatial: bool = True,
        conv_bias: bool = True,
        out_bn: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if not (channel or spatial):
            raise ValueError("gam needs channel=True, spatial=True or both")
        hidden = reduced_channels(channels, reduction)
        if spatial and (channels % groups or hidden % groups):
            raise ValueError(
                f"groups={groups} must divide both channels ({channels}) and the hidden width "
                f"channels // reduction ({hidden}); use groups=1, or a smaller reduction"
            )
        self.channels = channels
        self.groups = groups
        self.pool = pool
        self.channel_fc1 = nn.Linear(channels, hidden) if channel else None
        self.channel_fc2 = nn.Linear(hidden, channels) if channel else None
        if spatial:
            self.spatial_conv1 = nn.Conv2d(
                channels, hidden, 7, padding=3, groups=groups, bias=conv_bias
            )
            self.spatial_bn1 = nn.BatchNorm2d(hidden)
            self.spatial_conv2 = nn.Conv2d(
                hidden, channels, 7, padding=3, groups=groups, bias=conv_bias
            )
            self.spatial_bn2 = nn.BatchNorm2d(channels) if out_bn else nn.Identity()
        self.use_spatial = spatial

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """M_c(F), shape (N, C, H, W), values in (0, 1)."""
        pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): the MLP sees each pixel's C-vector
        hidden = F.relu(self.channel_fc1(pixels))
        return torch.sigmoid(self.channel_fc2(hidden).permute(0, 3, 1, 2))

    def spatial_attention(self, x: torch.Tensor) -> torch.Tensor:
        """M_s(F), shape (N, C, H, W), values in (0, 1)."""
        if self.pool:
            x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        hidden = F.relu(self.spatial_bn1(self.spatial_conv1(x)))
        hidden = channel_shuffle(hidden, self.groups)
        return torch.sigmoid(self.spatial_bn2(self.spatial_conv2(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "gam")
        if self.channel_fc1 is not None:
            x = self.channel_attention(x) * x
        if self.use_spatial:
            x = self.spatial_attention(x) * x
        return x
