"""CSM: channel and spatial attention module (Yang, Zhang, Yang, "Research on classification
algorithms for attention mechanism").

The module refines F_in (C, H, W) in two steps (Eqs. 1-2):
    F_1   = M_c(F_in) * F_in                                  (Eq. 1, channel attention)
    F_out = M_s(F_1) (x) F_1                                  (Eq. 2, spatial attention)

Channel attention (Eqs. 3-4), the SE form:
    F_avg = 1/(H W) sum_{i,j} F_in(i, j)                      (Eq. 3)
    M_c   = sigmoid(W_2 ReLU(W_1 F_avg)),  W_1: C -> C/r, W_2: C/r -> C   (Eq. 4)

Spatial attention (Fig. 3, Eq. 5): A = F_1 gives B, C, D by convolutions, and
    M_s,ij = exp(B_i . C_j) / sum_{i=1}^{HW} exp(B_i . C_j)   (Eq. 5, an HW x HW map)
Eq. 5 is DANet's Eq. 1 word for word, and Fig. 3 uses DANet's letters A, B, C, D.

Choices the paper leaves open, and ours:
- Eq. 2 reads "element-wise multiplication", which cannot apply an (HW x HW) map to a
  (C, H, W) tensor, and the text never says what D is for. We read the spatial module as
  DANet's position attention (``danet.PositionAttention``, reused here):
      F_out = gamma (D M_s^T) + F_1,   gamma a learnable scalar initialised to 0,
  so at initialisation the module is the channel attention alone. The residual and gamma
  come from DANet, not from this paper.
- Softmax axis: as in DANet, each output position's weights over all HW positions sum to
  one (Eq. 5 normalises over i for each j). As Eq. 5 is written, B_i is the key and C_j
  the query; we follow DANet's code, which calls B the query (see ``danet.py``). The two
  convs have the same shape and init, so this only names them; the function is the same.
- Convolutions producing B, C, D: the paper says "convolutional layers" without a kernel
  size; we use 1x1 convolutions with bias, as DANet does.
- Width of B and C: Fig. 3 states {B, C, D} in R^{C x H x W}, so the default is
  ``qk_reduction=1`` (B and C keep C channels, unlike DANet's code, which uses C/8).
  ``qk_reduction=8`` gives DANet's width, ``max(1, C // 8)``.
- r: the paper calls it a hyperparameter and does not give its value; we use 16 (SE's
  default; the paper compares against SE). Hidden width ``max(1, C // r)``
  (``rd_rule="floor"``, as for SE; ``"round8"`` is timm's rule). The FC layers have biases,
  as in SE; the channel branch *is* our ``SqueezeExcite``.
- No 1/sqrt(d) scaling in Eq. 5: ``scaled_dot_product_attention`` runs with ``scale=1.0``.

Variants (the paper's ablations):
- ``mode``: "csm" (channel then spatial, default), "cam" (channel only: baseline + CAM in
  Table 1 / Fig. 5), "sam" (spatial only: baseline + SAM).
- ``order``: "channel_first" (default, Eqs. 1-2) or "spatial_first" (Fig. 6: F_1 =
  SAM(F_in), F_out = CAM(F_1)); the paper found channel first better. Only used with
  mode "csm".

Cost: the spatial map is quadratic in HW (HW = 1024 in stage 1 of a CIFAR ResNet). torch's
fused attention kernel never stores the HW x HW matrix, so memory stays linear in HW, but
time is quadratic.

"Lightweight"? The abstract calls the module lightweight and Sec. 4 says it reduces
computing time; neither holds for the module as its equations define it, wherever it goes.
The paper never says where the module is placed. We place it as SE and CBAM are placed (in
every residual block, the backbone's default): ResNet-50 + CSM at 224x224 is then 88.5M
parameters and 32.1 GMACs, against 25.6M and 4.09 GMACs plain (docs/params.md), because
Fig. 3's full-width B and C (``qk_reduction=1``) add 2C^2 parameters per block and the
position attention's (HW)^2 C products dominate in the early stages (layer1: 56x56 = 3,136
positions). ``qk_reduction=8`` (DANet's width) still gives 53.3M and 26.3 GMACs: D keeps
C^2 per block and the (HW)^2 cost stays. ``placement="stage"`` or ``"final"`` (one module per stage boundary or on
the last map) make it cheap, and are the readings to try if "lightweight" is what the paper
meant. The tables' rows use the per-block placement and say so.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .danet import PositionAttention
from .layers import check_input
from .se import SqueezeExcite

MODES = ("csm", "cam", "sam")
ORDERS = ("channel_first", "spatial_first")


@register_attention("csm")
class CSM(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_rule: str = "floor",
        qk_reduction: float = 1,
        mode: str = "csm",
        order: str = "channel_first",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; choose one of: {', '.join(ORDERS)}")
        self.channels = channels
        self.mode = mode
        self.order = order
        self.channel = (
            SqueezeExcite(channels, reduction=reduction, rd_rule=rd_rule)
            if mode in ("csm", "cam")
            else None
        )
        self.spatial = PositionAttention(channels, qk_reduction) if mode in ("csm", "sam") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "csm")
        steps = [self.channel, self.spatial]
        if self.order == "spatial_first":
            steps.reverse()
        for step in steps:
            if step is not None:
                x = step(x)
        return x
