"""Exact resume (attnzoo/train/engine.py, data/loader.py): inside an epoch, after SIGKILL.

A resumed run must give bitwise the weights and metrics of the run that never stopped.
"""

from __future__ import annotations

import random
import subprocess

import numpy as np
import pytest
import torch
from run_helpers import (
    TINY,
    assert_same_run,
    attnzoo,
    kill_after_saves,
    leftovers,
    start,
)

from attnzoo.data import InMemoryLoader
from attnzoo.train import resolve_config, resume, train

SEED = 20251125  # the kill points of the SIGKILL test come from random.Random(SEED)


def quiet(message: str) -> None:
    pass


class Crash(Exception):
    pass


# ------------------------------------------------------------------ the loader


def test_loader_state_continues_inside_an_epoch():
    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True, pad=2, flip=True, seed=7)
    loader = InMemoryLoader(images, np.arange(40), 8, **common)
    list(loader)  # one whole epoch first: the state is not just the seed
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    assert state["position"] == 2 and state["order"] is not None
    rest = list(it)

    again = InMemoryLoader(images, np.arange(40), 8, **common)
    again.load_state_dict(state)
    assert again.state_dict()["position"] == 2  # a loaded state is what it saves, until used
    resumed = list(again)
    assert len(first) + len(resumed) == len(loader)
    for (xa, ya), (xb, yb) in zip(rest, resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and the epoch after that is the same too
    for (xa, ya), (xb, yb) in zip(loader, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert loader.state_dict()["order"] is None  # between epochs


def test_loader_refuses_a_state_of_other_data():
    images = np.zeros((16, 4, 4, 3), dtype=np.uint8)
    loader = InMemoryLoader(images, np.arange(16), 4, (0.5,) * 3, (0.25,) * 3, train=True)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    smaller = InMemoryLoader(images[:8], np.arange(8), 4, (0.5,) * 3, (0.25,) * 3, train=True)
    with pytest.raises(ValueError, match="permutation"):
        smaller.load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": 4})


# ------------------------------------------------------------------ inside an epoch, in-process


def small_config(**overrides):
    values = dict(
        dataset="digits", model="resnet20", epochs=2, batch_size=32, train_subset=128,
        threads=1, progress=False, recipe="digits",
    )  # fmt: skip
    values.update(overrides)
    return resolve_config(values.pop("recipe"), **values)


def test_resume_inside_an_epoch_is_exact(tmp_path, monkeypatch, crash_after_saves):
    # 4 steps per epoch, a checkpoint every 3: saves at steps 3 (mid epoch 1), 4 (end of
    # epoch 1), 6 (mid epoch 2). Crash right after the third: resume 2 steps into epoch 2.
    reference = tmp_path / "reference"
    train(small_config(), reference, log=quiet)  # no step checkpoints at all

    saves = crash_after_saves(3, Crash)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(small_config(checkpoint_every_steps=3), run, log=quiet)
    monkeypatch.undo()
    assert saves == [3, 4, 6]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["progress"]["steps_done"]) == (1, 6, 2)
    assert state["loader"]["position"] == 2

    messages = []
    resume(run, log=messages.append)
    assert messages[0] == f"resuming {run} after epoch 1/2, step 6 (2 steps into epoch 2) on cpu"
    # Also shows that saving inside epochs leaves the training itself untouched.
    assert_same_run(run, reference)
    assert leftovers(run) == []


# ------------------------------------------------------------------ SIGKILL, in subprocesses


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tiny_reference, tmp_path):
    """Kill the run twice with SIGKILL (after a random number of checkpoint saves plus a random
    delay, so the kill lands mid-step, mid-evaluation or mid-save), then finish it with
    ``attnzoo train --resume``; compare with the run that was never killed."""
    rng = random.Random(SEED)
    run = tmp_path / "run"
    stops = []
    victim = start("train", *TINY, "--out", run)
    stops.append(kill_after_saves(victim, run, rng.randint(1, 4), rng.uniform(0, 0.08)))
    victim = start("train", "--resume", run)
    stops.append(kill_after_saves(victim, run, rng.randint(1, 3), rng.uniform(0, 0.08)))

    final = subprocess.run(
        attnzoo("train", "--resume", run), capture_output=True, text=True, timeout=600
    )
    assert final.returncode == 0, final.stderr
    assert "resuming" in final.stdout and "done: test error" in final.stdout
    assert_same_run(run, tiny_reference.result())
    assert leftovers(run) == [], stops
    print(f"killed at {stops}")  # pytest -s shows where the kills landed
