"""Learning-rate schedules (attnzoo/train/schedule.py)."""

from __future__ import annotations

import math

import pytest

from attnzoo.train import resolve_config
from attnzoo.train.schedule import learning_rate


def test_ham_schedule_over_200_epochs():
    cfg = resolve_config("ham")
    epochs = [0, 59, 60, 119, 120, 159, 160, 199]
    expected = [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008]
    assert [learning_rate(cfg, e) for e in epochs] == pytest.approx(expected, rel=1e-12)


def test_multistep_changes_only_at_epoch_boundaries():
    cfg = resolve_config("ham")
    assert learning_rate(cfg, 59.999) == pytest.approx(0.1)
    assert learning_rate(cfg, 60.0) == pytest.approx(0.02)
    assert learning_rate(cfg, 60.5) == pytest.approx(0.02)


def test_milestones_scale_with_the_run_length():
    cfg = resolve_config("ham", epochs=10)
    rates = [learning_rate(cfg, e) for e in range(10)]
    drops = [e for e in range(1, 10) if rates[e] < rates[e - 1] * 0.99]
    assert drops == [3, 6, 8]
    assert rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.1 * 0.2**3)


def test_multistep_gamma_and_custom_milestones():
    cfg = resolve_config("ham", epochs=100, lr=1.0, gamma=0.5, milestones=[0.5])
    assert learning_rate(cfg, 49) == 1.0 and learning_rate(cfg, 50) == 0.5
    assert learning_rate(cfg, 99) == 0.5


def test_cosine_from_lr_to_zero():
    cfg = resolve_config("cosine", epochs=20, lr=0.2)
    assert learning_rate(cfg, 0) == pytest.approx(0.2)
    assert learning_rate(cfg, 10) == pytest.approx(0.1)  # half-way: lr/2
    assert learning_rate(cfg, 20 - 1 / 50) < 1e-5  # last step of the run
    assert learning_rate(cfg, 20) == pytest.approx(0.0, abs=1e-15)
    grid = [learning_rate(cfg, e / 10) for e in range(201)]
    assert all(a >= b for a, b in zip(grid, grid[1:], strict=False))  # monotone
    t = 0.3
    assert learning_rate(cfg, 20 * t) == pytest.approx(0.1 * (1 + math.cos(math.pi * t)))


def test_warmup_then_cosine():
    cfg = resolve_config("cosine", epochs=11, lr=0.1, warmup_epochs=1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1e-3)
    assert learning_rate(cfg, 0.5) == pytest.approx(0.05, rel=1e-2)
    assert learning_rate(cfg, 1) == pytest.approx(0.1)  # warmup ends at lr
    assert learning_rate(cfg, 6) == pytest.approx(0.05)  # cosine runs over epochs 1..11
    assert learning_rate(cfg, 11) == pytest.approx(0.0, abs=1e-15)


def test_constant():
    cfg = resolve_config("ham", schedule="constant", lr=0.03, epochs=5)
    assert {learning_rate(cfg, e / 3) for e in range(15)} == {0.03}
