"""Triplet attention (Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend", WACV 2021).

Three branches, each a CBAM-like spatial gate over a different pair of the axes (C, H, W)
(equation numbers as in Misra et al.):
    Z-pool(X) = [MaxPool_0d(X); AvgPool_0d(X)]   max and mean over the first axis   (Eq. 1)
    branch(X) = X * sigmoid(BN(conv_kxk(Z-pool(X))))
    y = 1/3 (rot1^-1(branch(rot1(F))) + rot2^-1(branch(rot2(F))) + branch(F))  (Eqs. 2-3)
rot1 turns F (N, C, H, W) into (N, W, H, C): W becomes the pooled axis, and the gate is a
map over (H, C), the C-H interaction. rot2 gives (N, H, C, W): H is pooled, the gate is a
map over (C, W), the C-W interaction. The third branch is the plain spatial (H, W) gate.

Defaults: k = 7, conv 2 -> 1 with no bias, then BN (PyTorch's momentum 0.1; the official
code's is 0.01, ``bn_momentum=0.01``), then sigmoid; each branch has its own conv and BN. Z-pool stacks
[max; mean] in that order, as the paper writes it and as the official ``ZPool``/``ChannelPool``
does (``pool_order="max_mean"``, the default). ``pool_order="mean_max"`` stacks [mean; max],
CBAM's Eq. 3 order (the default of ``cbam``): the same function up to the order of each conv's
two input channels (a ``"mean_max"`` module with ``conv.weight[:, 0]`` and ``[:, 1]`` swapped
in every branch computes exactly what the ``"max_mean"`` one does).

Choices the paper leaves open, and ours:
- "Rotation": the paper rotates the tensor 90 degrees about an axis; like the official code
  we swap the two axes (a transpose). A true rotation also flips one axis of the 2-D map;
  for a kxk conv with symmetric padding that equals the transpose with a flipped kernel,
  so the two define the same family of modules.
- Map orientation (which axis is the rows of the 2-D map) is as in the official code:
  (H rows, C columns) for the C-H branch and (C rows, W columns) for the C-W branch.
  With a square kernel this, too, only re-indexes the kernel.
- ``no_spatial=True`` drops the (H, W) branch, y = 1/2 (y1 + y2) (the paper's ablation and
  the official option of the same name).
- Official names: ``channel_width`` is the official ``ChannelGateH`` (``cw`` in the repository's
  root ``triplet_attention.py``; it is applied to ``x.permute(0, 2, 1, 3)``, pooling H),
  ``channel_height`` is ``ChannelGateW`` (``hc``; ``x.permute(0, 3, 2, 1)``, pooling W) and
  ``height_width`` is ``SpatialGate`` (``hw``); ``attnzoo.convert`` maps them.
- The module has no parameter that depends on C; ``channels`` is taken for the common
  interface and checked against the input.

Implementation: no tensor is rotated. Each branch pools F directly over its axis (W, H or
C), the small pooled maps are transposed into the (rows, cols) layout above for the conv,
and y = F * 1/3 (g1 + g2 + g3) with the three gates broadcast, all as one fused autograd
node (``layers.pooled_gate``): the same values as the three-branch expression to float
rounding, with one multiply over F instead of three. On the CPU (float32, bf16) with the
fused gate kernels (``attnzoo.kernels``, ``attention/fused.py``) the three poolings are one
pass over F (``tri_pool``), the product another, and backward two more (``tri_dot``,
``tri_broadcast``); the averaged gate is never formed. CUDA takes the PyTorch node.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import channel_max, check_input, gate_conv2d, pooled_gate

POOL_ORDERS = ("max_mean", "mean_max")


class ZPoolGate(nn.Module):
    """x * sigmoid(BN(conv_kxk([max_1(x); mean_1(x)]))), pooling over dim 1 of x
    (``pool_order="mean_max"``: [mean; max])."""

    def __init__(
        self, kernel_size: int = 7, bn_momentum: float = 0.1, pool_order: str = "max_mean"
    ) -> None:
        super().__init__()
        if pool_order not in POOL_ORDERS:
            raise ValueError(
                f"unknown pool_order {pool_order!r}; choose one of: {', '.join(POOL_ORDERS)}"
            )
        self.pool_order = pool_order
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum)

    def logits(self, max_: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """BN(conv([max; mean])) (or [mean; max]) for pooled maps (N, 1, rows, cols)."""
        pair = [max_, mean] if self.pool_order == "max_mean" else [mean, max_]
        return self.bn(gate_conv2d(torch.cat(pair, dim=1), self.conv))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(channel_max(x), x.mean(dim=1, keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


@register_attention("triplet")
class TripletAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        no_spatial: bool = False,
        bn_momentum: float = 0.1,
        pool_order: str = "max_mean",
    ) -> None:
        super().__init__()
        if (
            not isinstance(kernel_size, int)
            or isinstance(kernel_size, bool)
            or kernel_size < 1
            or kernel_size % 2 == 0
        ):
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.channels = channels
        gate = (kernel_size, bn_momentum, pool_order)
        self.channel_height = ZPoolGate(*gate)  # C-H interaction, W pooled
        self.channel_width = ZPoolGate(*gate)  # C-W interaction, H pooled
        self.height_width = None if no_spatial else ZPoolGate(*gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "triplet")
        # (dims pooled, the permutation that lays the pooled map out as (rows, cols); both
        # permutations are their own inverses, so they also map the logits back).
        layout = [
            ((3,), (0, 3, 2, 1), self.channel_height),
            ((2,), (0, 2, 1, 3), self.channel_width),
        ]
        if self.height_width is not None:
            layout.append(((1,), (0, 1, 2, 3), self.height_width))
        branches = tuple((dims, True, _branch_logits(gate, perm)) for dims, perm, gate in layout)
        return pooled_gate(x, branches, tuple(self.parameters()))[0]


def _branch_logits(gate: ZPoolGate, perm: tuple[int, ...]):
    """transform(mean, max) for ``pooled_gate``: the branch's logits in F's axes."""

    def logits(mean: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
        return gate.logits(max_.permute(perm), mean.permute(perm)).permute(perm)

    return logits
