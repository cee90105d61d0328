"""Helpers for the training-option tests: a tiny in-process Trainer and its first batches."""

from __future__ import annotations

from pathlib import Path

import torch

from attnzoo.train import resolve_config
from attnzoo.train.engine import Trainer


def tiny_config(**overrides):
    """resnet20 on 64 digits, batch 32 (2 steps per epoch), fp32, one thread, constant lr."""
    values = dict(
        dataset="digits", model="resnet20", epochs=1, batch_size=32, train_subset=64,
        test_subset=32, threads=1, progress=False, precision="fp32", compile=False,
        schedule="constant", warmup_epochs=0, recipe="digits",
    )  # fmt: skip
    values.update(overrides)
    return resolve_config(values.pop("recipe"), **values)


def tiny_trainer(tmp_path: Path, **overrides) -> Trainer:
    return Trainer(tiny_config(**overrides), tmp_path / "run")


def peek_batches(trainer: Trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training loader's next ``count`` batches, leaving the loader where it was."""
    loader = trainer.train_loader
    state = loader.state_dict()
    it = iter(loader)
    batches = [next(it) for _ in range(count)]
    loader.load_state_dict(state)
    return batches
