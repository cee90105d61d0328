"""Non-local block, embedded Gaussian version (Wang, Girshick, Gupta, He, "Non-local Neural
Networks", CVPR 2018, arXiv:1711.07971; official code facebookresearch/video-nonlocal-net,
``lib/models/nonlocal_helper.py``). Registered as ``nonlocal`` (the file is ``non_local.py``:
``nonlocal`` is a Python keyword, so a module of that name could not be imported by name).

For x (N, C, H, W) and positions i (outputs) and j (all positions):

    y_i = 1 / C(x) sum_j f(x_i, x_j) g(x_j)                          (Eq. 1)
    f(x_i, x_j) = exp(theta(x_i)^T phi(x_j)),  C(x) = sum_j f(x_i, x_j)   (Eq. 3, embedded
                                                                      Gaussian)
    z_i = W_z y_i + x_i                                              (Eq. 6)

so y = softmax over j of theta^T phi, applied to g (Sec. 3.2: for a given i, the
normalisation by C(x) is a softmax along j). theta, phi, g are 1x1 convs C -> C/2 (the
paper halves the channels, Sec. 3.3; ``reduction=2``); W_z is a 1x1 conv C/2 -> C followed
by BatchNorm whose scale is initialised to zero, so the block starts as the identity (Sec.
3.3; the code's ``BN_INIT_GAMMA = 0``).

Choices, and where the official code differs:
- Inner width ``max(1, int(C // reduction))``.
- No 1/sqrt(d) scale on theta^T phi: Eq. 3 has none. The official code's default config
  scales by dim_inner ** -0.5 (``NONLOCAL.USE_SCALE = True``); the paper does not mention
  it.
- ``subsample`` (default False): the paper's subsampling trick (Sec. 3.3), a 2 x 2 max
  pooling placed after phi and g, which cuts the keys and values to a quarter. We pool
  phi(x) and g(x) as the paper says; the official code pools x before its phi and g convs
  (the two differ: a max does not commute with a 1x1 conv). Ours pools with
  ``ceil_mode=True``, so an odd side keeps its last row or column (7 x 5 -> 4 x 3; the
  code's floor pooling would drop it), and pools only along a side of at least 2 (a 1 x 5
  map pools to 1 x 3, a 1 x 1 map is kept as it is): there is nothing to pool along a side
  of 1.
- All four convs have biases and BN follows W_z, as in the official code (it also inits the
  convs from N(0, 0.01); we keep PyTorch's defaults). Three of those biases get no
  gradient: phi's adds theta_i . b to every logit of query i, which the softmax over j
  ignores; in training mode g's (which passes through the softmax average unchanged) and
  W_z's are constants that the BN's batch mean removes.
- The softmax is torch's fused ``scaled_dot_product_attention`` (scale 1): it never stores
  the HW x HW map. The energies theta^T phi and the softmax run in float32 with autocast off
  (``layers.in_float32``): fp16 energies overflow past 65504, and bf16 ones are too coarse.
- Placement: ``stage`` by default (one block after each stage but the last). The paper
  inserts a few blocks into the later stages of a ResNet rather than one per residual block:
  its video models add 5 or 10 blocks to res3 and res4, its COCO models one block before the
  last residual block of res4. Our stage boundaries are the nearest fixed placement; every
  residual block (``placement="block"``) is quadratic in HW at every block and much heavier.
  ResNet-50 + nonlocal (three blocks, C = 256, 512, 1024): 28,317,608 parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input, in_float32


def subsample_2x2(t: torch.Tensor) -> torch.Tensor:
    """2 x 2 max pooling with stride 2 along each side of at least 2 (ceil mode)."""
    h, w = t.shape[2], t.shape[3]
    window = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
    if window == (1, 1):
        return t
    return F.max_pool2d(t, window, window, ceil_mode=True)


def embedded_gaussian(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """y_i = sum_j softmax_j(theta_i . phi_j) g_j, without a scale.

    ``theta``: (N, C', H, W); ``phi``, ``g``: (N, C', H', W') (fewer positions after
    subsampling). Returns y, (N, C', H, W), in ``g``'s dtype: the energies, the softmax and
    the weighted sum of g (one fused kernel) run in float32 (``in_float32``); a convex
    combination of g's rows is within g's range, so the cast back cannot overflow.
    """
    return _embedded_gaussian(theta, phi, g).to(g.dtype)


@in_float32
def _embedded_gaussian(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n, c, h, w = theta.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        # (N, 1, positions, C') with unit stride on C': the layout the fused kernel takes.
        return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

    y = F.scaled_dot_product_attention(tokens(theta), tokens(phi), tokens(g), scale=1.0)
    return y.reshape(n, h, w, c).permute(0, 3, 1, 2)


@register_attention("nonlocal", placement="stage")
class NonLocalBlock(nn.Module):
    def __init__(self, channels: int, reduction: float = 2, subsample: bool = False) -> None:
        super().__init__()
        if (
            not isinstance(reduction, (int, float))
            or isinstance(reduction, bool)
            or not reduction > 0
            or not math.isfinite(reduction)
        ):
            raise ValueError(f"reduction must be a finite number > 0, got {reduction!r}")
        if not isinstance(subsample, bool):
            raise ValueError(f"subsample must be True or False, got {subsample!r}")
        inner = max(1, int(channels // reduction))
        self.channels = channels
        self.subsample = subsample
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out_conv = nn.Conv2d(inner, channels, 1)  # W_z
        self.out_bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.out_bn.weight)

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """y (Eq. 1), shape (N, C/2, H, W)."""
        phi, g = self.phi(x), self.g(x)
        if self.subsample:
            phi, g = subsample_2x2(phi), subsample_2x2(g)
        return embedded_gaussian(self.theta(x), phi, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "nonlocal")
        return x + self.out_bn(self.out_conv(self.aggregate(x)))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, subsample={self.subsample}"
