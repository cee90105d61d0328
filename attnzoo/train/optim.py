"""The optimizer of a run: SGD (the papers' recipes) or AdamW.

- ``optimizer="sgd"``: ``torch.optim.SGD(lr, momentum, nesterov, weight_decay)`` over all
  parameters, weight decay on every one of them (BN and biases included), as the papers'
  recipes and this project always did. ``betas`` is not used.
- ``optimizer="adamw"``: ``torch.optim.AdamW(lr, betas, weight_decay)`` (decoupled weight
  decay, Loshchilov & Hutter, ICLR 2019, https://arxiv.org/abs/1711.05101). Weight decay
  applies to the weight matrices and kernels only: parameters with fewer than two
  dimensions (BN/LayerNorm scales and shifts, biases, the scalar gates of some attention
  modules) are in a second group without it, as in timm's and DeiT's AdamW recipes -- with
  decoupled decay, shrinking a BN scale only rescales what the next layer sees.
  ``momentum`` and ``nesterov`` are not used (``betas[0]`` is AdamW's momentum).
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


def check_optimizer(name: str, betas: list) -> None:
    """Validate ``optimizer`` and ``betas`` (errors name the fix)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if (
        not isinstance(betas, (list, tuple))
        or len(betas) != 2
        or not all(
            isinstance(b, (int, float))
            and not isinstance(b, bool)
            and math.isfinite(b)
            and 0 <= b < 1
            for b in betas
        )
    ):
        raise ValueError(f"betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas!r}")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameters in two groups: with ``weight_decay`` (ndim >= 2) and without (ndim < 2)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 5e-4,
    betas: list | tuple = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters (the module docstring has the rules)."""
    check_optimizer(name, list(betas))
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
        )
    return torch.optim.AdamW(
        decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), weight_decay=weight_decay
    )
