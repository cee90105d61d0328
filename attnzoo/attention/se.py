"""SE: Squeeze-and-Excitation (Hu, Shen, Albanie, Sun, Wu, CVPR 2018 / TPAMI 2020).

Equations (numbers as in Hu et al.):
    z = F_sq(u) = 1/(H W) sum_{i,j} u(i, j)                        (Eq. 2, squeeze)
    s = F_ex(z) = sigmoid(W2 relu(W1 z)),  W1: C -> C/r, W2: C/r -> C  (Eq. 3, excitation)
    out = s * u                                                     (Eq. 4, channel scaling)

Defaults: reduction r = 16; both FC layers have biases (as in the paper's Caffe release).

Hidden width (the paper leaves C/r non-integer cases open): ``rd_rule="floor"`` gives
``max(1, C // r)`` (default; matches the parameter columns of the HAM tables), and
``rd_rule="round8"`` gives timm's "nearest multiple of 8" rule. ``rd_channels`` overrides both.
On a CIFAR ResNet-20 the floor rule adds 2,373 parameters and round8 adds 5,784 (2.4x).

Implementation: squeeze, excitation and scaling run as one fused autograd node
(``layers.pooled_gate``): same values, a hand-written backward with fewer passes over u. On the CPU (float32, bf16) and on CUDA
(Triton) the node runs on the fused gate kernels of ``attnzoo.kernels`` (``attention/fused.py``:
one read of the map per pass, 4 passes forward and backward); ``ATTNZOO_KERNELS=off`` or
``layers.plain_gates()`` selects the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_attention
from .layers import check_input, pooled_gate, reduced_channels


@register_attention("se")
class SqueezeExcite(nn.Module):
    def __init__(
        self,
        channels: int,
        reduction: float = 16,
        rd_rule: str = "floor",
        rd_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        hidden = (
            rd_channels
            if rd_channels is not None
            else reduced_channels(channels, reduction, rd_rule)
        )
        if hidden < 1:
            raise ValueError(f"rd_channels must be >= 1, got {hidden}")
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def excitation(self, z: torch.Tensor, _max: None = None) -> torch.Tensor:
        """W2 relu(W1 z): the logits of s from the squeezed z (N, C, 1, 1)."""
        return self.fc2(self.act(self.fc1(z)))

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights s, shape (N, C, 1, 1)."""
        return torch.sigmoid(self.excitation(x.mean(dim=(2, 3), keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "se")
        return pooled_gate(x, (((2, 3), False, self.excitation),), tuple(self.parameters()))[0]
