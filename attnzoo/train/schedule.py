"""Learning rate as a function of training progress (in epochs, fractional)."""

from __future__ import annotations

import math

from .config import TrainConfig


def learning_rate(cfg: TrainConfig, epoch: float) -> float:
    """lr at ``epoch`` (0 <= epoch < cfg.epochs; fractional within an epoch).

    multistep: lr * gamma^(number of milestones passed), milestones at max(1, round(f * epochs))
    (the HAM recipe: /5 at 60, 120, 160 of 200), changing at epoch boundaries;
    cosine: per step, from lr to 0 over the run after warmup; constant: lr.
    A linear warmup over ``warmup_epochs`` comes first when set.
    """
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "multistep":
        # A milestone never falls on epoch 0: a 1-epoch run keeps the base lr.
        steps = sum(int(epoch) >= max(1, round(m * cfg.epochs)) for m in cfg.milestones)
        return cfg.lr * cfg.gamma**steps
    if cfg.schedule == "cosine":
        span = cfg.epochs - cfg.warmup_epochs
        t = (epoch - cfg.warmup_epochs) / span
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    return cfg.lr
