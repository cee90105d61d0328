"""Mixup and CutMix on whole training batches, with torchvision's ``transforms.v2``.

- mixup (Zhang et al., ICLR 2018, https://arxiv.org/abs/1710.09412): ``MixUp(alpha)``,
  ``x = lam * x + (1 - lam) * x.roll(1, 0)`` with ``lam ~ Beta(alpha, alpha)``;
- CutMix (Yun et al., ICCV 2019, https://arxiv.org/abs/1905.04899): ``CutMix(alpha)``, a
  box of area ``1 - lam`` pasted from the batch rolled by one, ``lam`` adjusted to the box.

Settings (TrainConfig): ``mixup_alpha`` and ``cutmix_alpha`` (0 = off), ``mix_prob`` (the
probability that a batch is mixed at all, ``v2.RandomApply``) and ``mix_switch_prob`` (with
both on, the probability of CutMix rather than mixup for a batch, ``v2.RandomChoice``) -- as
timm's ``mixup_alpha``, ``cutmix_alpha``, ``mixup_prob``, ``mixup_switch_prob``.

A mixed batch's targets are class probabilities ``(N, classes)``, which
``F.cross_entropy`` takes as they are (``label_smoothing`` smooths them further). A batch
that ``mix_prob`` leaves alone keeps its class indices. ABN's auxiliary logits are trained
against the same mixed targets (loss.py sums the cross-entropy of every output).

Randomness: torchvision draws ``lam``, the box, the choice and the ``RandomApply`` coin from
torch's global RNG (``Beta.sample``, ``torch.randint``, ``torch.multinomial``,
``torch.rand``), which every checkpoint saves and a resume restores, so a resumed run mixes
exactly as the uninterrupted one. Data-parallel processes share the seed and so draw the same
``lam`` and box; each mixes within its own slice of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import v2

Mixing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_mixing(
    mixup_alpha: float, cutmix_alpha: float, mix_prob: float, mix_switch_prob: float
) -> None:
    """Validate the mixing settings of a TrainConfig (errors name the fix)."""
    for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{name} is the Beta(alpha, alpha) parameter, a finite number >= 0 (0 = off); "
                f"got {value!r}"
            )
    for name, value in (("mix_prob", mix_prob), ("mix_switch_prob", mix_switch_prob)):
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_mixing(
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
    mix_switch_prob: float = 0.5,
) -> Mixing | None:
    """``(x, labels) -> (x, targets)`` for a training batch, or None when mixing is off."""
    check_mixing(mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob)
    if mix_prob == 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
        return None
    transforms = []
    if mixup_alpha > 0:
        transforms.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        transforms.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if len(transforms) == 2:
        transform = v2.RandomChoice(transforms, p=[1 - mix_switch_prob, mix_switch_prob])
    else:
        transform = transforms[0]
    if mix_prob < 1:
        transform = v2.RandomApply([transform], p=mix_prob)

    def mix(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision mixes the image tensor out of place (roll, then in-place on the copy).
        return transform(x, labels)

    return mix
