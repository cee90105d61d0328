"""Gather-Excite (Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting Feature Context
in Convolutional Neural Networks", NeurIPS 2018, arXiv:1810.12348; official code
hujie-frank/GENet: Caffe prototxts of ResNet-50 with GE-theta^- (``RN50-GEPF``), GE-theta
(``RN50-GEP``) and GE-theta^+ (``RN50-GEPP``), all with the global extent, and schema figures
of the extent-8 operators).

A gather operator xi_G pools x (N, C, H, W) over windows of spatial extent e into a coarser map
x^ (N, C, H', W'), H' = ceil(H / e), W' = ceil(W / e) (one value per channel for the global
extent); an excite operator xi_E redistributes it to every position:

    x^ = xi_G(x)
    y  = xi_E(x, x^) = x * f(x^),    f(x^) = sigmoid(interp(x^))

with interp nearest-neighbour interpolation back to H x W. The paper's three operator pairs
(``variant``):

- ``"theta_minus"`` (GE-theta^-, parameter-free): xi_G is average pooling. Global extent: the
  mean over H x W (SE without its MLP). Extent e: as the official E8 schema, a (2e - 1) x
  (2e - 1) average pool of stride e and padding e - 1 (15 x 15, stride 8 for e = 8), so
  windows centred every e positions overlap their neighbours by e - 1.
- ``"theta"`` (GE-theta): xi_G is learned, strided depthwise convolutions. Extent e: log2(e)
  depthwise 3 x 3 convs of stride 2 (padding 1), each followed by BN, with ReLU between them
  (DWConv+BN+ReLU, ..., DWConv+BN, as the official E8 schema). Global extent: one depthwise
  conv whose kernel is the whole H x W map, then BN (``RN50-GEP``: kernel 56 on the 56 x 56
  maps); it needs the map size, ``feat_size``.
- ``"theta_plus"`` (GE-theta^+): theta's gather, then ReLU, then an SE-like excite MLP,
  f(x^) = sigmoid(interp(W_2 relu(W_1 x^))), 1 x 1 convs C -> C/r -> C with biases, r = 16,
  hidden width max(1, C // r) (``RN50-GEPP``: depthwise gather, BN, ReLU, 1x1 down, ReLU,
  1x1 up, sigmoid). No schema shows theta^+ with a finite extent: we end its conv chain with
  the same ReLU as ``RN50-GEPP`` (timm's ``GatherExcite`` goes from the last BN straight
  into its MLP).

Choices:
- Default ``variant="theta_minus"``, ``extent="global"``: the paper's headline result is
  parameter-free (its abstract: ResNet-50 with gather-excite outperforms ResNet-101 with no
  added learnable parameters), the official parameter-free ResNet-50 (``RN50-GEPF``) uses the
  global extent, and it is the one operator that fits any map size without knowing it in
  advance. The issue's "theta (parameter-free)" is this GE-theta^-: in the paper, GE-theta
  is the learned depthwise gather.
- ``extent``: "global" (or 0) or a power of two >= 2 (the paper studies 2, 4 and 8).
- Maps smaller than the extent: the padded pooling (theta^-) and the padded stride-2 convs
  (theta) both give ceil(H / e) x ceil(W / e) outputs, never an empty one: a 1 x 1 map
  gathers to itself (theta^-: sigmoid(x) gates x), a 7 x 5 map with e = 8 to one value per
  channel, the mean of the whole map. theta^-'s windows average only the positions inside
  the map (``count_include_pad=False``; the schema does not say).
- interp is ``F.interpolate(mode="nearest")``: position i takes row floor(i H' / H), which
  is floor(i / e) whenever e divides H. It commutes with theta^+'s 1 x 1 convs, so the MLP
  runs on the small gathered map.
- The depthwise convs have no bias (BN follows them), as in the prototxts.
- theta and theta^+ with the global extent reject inputs of another size than ``feat_size``.
  The BNs need more than one value per channel in training mode: a 1 x 1 gathered map (the
  global extent, or a map no larger than e) has one per sample, so train with batches of 2+.
- Placement: in every residual block, on the residual branch before the addition (the
  official schemas).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input, pooled_gate, reduced_channels

VARIANTS = ("theta_minus", "theta", "theta_plus")


def _check_extent(extent: object) -> int | None:
    """None for the global extent, else e (a power of two >= 2)."""
    if extent == "global" or (type(extent) is int and extent == 0):
        return None
    if (
        isinstance(extent, bool)
        or not isinstance(extent, int)
        or extent < 2
        or extent & (extent - 1)
    ):
        raise ValueError(
            f"extent must be 'global' (or 0) or a power of two >= 2 (the paper's 2, 4, 8), "
            f"got {extent!r}"
        )
    return extent


def _check_feat_size(feat_size: object) -> tuple[int, int]:
    size = (feat_size, feat_size) if isinstance(feat_size, int) else feat_size
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise ValueError(
            f"feat_size must be a positive int or a pair (H, W) of them, got {feat_size!r}"
        )
    return (size[0], size[1])


def _identity(mean: torch.Tensor, _max: None) -> torch.Tensor:
    return mean


@register_attention("ge")
class GatherExcite(nn.Module):
    def __init__(
        self,
        channels: int,
        variant: str = "theta_minus",
        extent: int | str = "global",
        feat_size: int | tuple[int, int] | None = None,
        reduction: float = 16,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"variant must be one of {VARIANTS} (GE-theta^-, GE-theta, GE-theta^+), "
                f"got {variant!r}"
            )
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        self.channels = channels
        self.variant = variant
        self.extent = _check_extent(extent)
        self.feat_size: tuple[int, int] | None = None
        learned_global = variant != "theta_minus" and self.extent is None
        if learned_global:
            if feat_size is None:
                raise ValueError(
                    f"ge variant {variant!r} with the global extent gathers with a depthwise "
                    f"conv over the whole map: give feat_size (the map's H, W), or use a "
                    f"finite extent (2, 4, 8)"
                )
            self.feat_size = _check_feat_size(feat_size)
        elif feat_size is not None:
            raise ValueError(
                "feat_size applies only to variant 'theta' or 'theta_plus' with the global extent"
            )
        self.gather_layers = self._build_gather(channels) if variant != "theta_minus" else None
        self.excite_mlp = None
        if variant == "theta_plus":
            hidden = reduced_channels(channels, reduction)
            self.excite_mlp = nn.Sequential(
                nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
            )

    def _build_gather(self, channels: int) -> nn.Sequential:
        def depthwise(kernel: int | tuple[int, int], stride: int, padding: int) -> nn.Conv2d:
            return nn.Conv2d(
                channels, channels, kernel, stride, padding, groups=channels, bias=False
            )

        layers: list[nn.Module] = []
        if self.extent is None:
            layers += [depthwise(self.feat_size, 1, 0), nn.BatchNorm2d(channels)]
        else:
            steps = self.extent.bit_length() - 1  # log2(e)
            for step in range(steps):
                layers += [depthwise(3, 2, 1), nn.BatchNorm2d(channels)]
                if step < steps - 1:
                    layers.append(nn.ReLU())
        if self.variant == "theta_plus":
            layers.append(nn.ReLU())  # before the excite MLP, as RN50-GEPP
        return nn.Sequential(*layers)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """xi_G(x): (N, C, ceil(H / e), ceil(W / e)), or (N, C, 1, 1) for the global extent."""
        if self.gather_layers is None:
            if self.extent is None:
                return x.mean(dim=(2, 3), keepdim=True)
            e = self.extent
            return F.avg_pool2d(x, 2 * e - 1, stride=e, padding=e - 1, count_include_pad=False)
        if self.feat_size is not None and tuple(x.shape[2:]) != self.feat_size:
            raise ValueError(
                f"ge variant {self.variant!r} with the global extent was built for "
                f"{self.feat_size[0]}x{self.feat_size[1]} maps (feat_size), got "
                f"{x.shape[2]}x{x.shape[3]}"
            )
        return self.gather_layers(x)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """f(xi_G(x)) = sigmoid(interp(...)): (N, C, H, W), or (N, C, 1, 1) when global."""
        gathered = self.gather(x)
        if self.excite_mlp is not None:
            gathered = self.excite_mlp(gathered)
        if gathered.shape[2:] != (1, 1):
            gathered = F.interpolate(gathered, size=x.shape[2:], mode="nearest")
        return torch.sigmoid(gathered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "ge")
        if self.variant == "theta_minus" and self.extent is None:
            # x * sigmoid(mean x): the fused gate SE uses (same values, cheaper backward).
            return pooled_gate(x, (((2, 3), False, _identity),), ())[0]
        return x * self.gate(x).to(x.dtype)

    def extra_repr(self) -> str:
        extent = "global" if self.extent is None else self.extent
        return f"channels={self.channels}, variant={self.variant!r}, extent={extent!r}"
