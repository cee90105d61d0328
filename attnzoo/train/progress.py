"""Where a run stands inside an epoch, and how it stops: what exact resume needs.

- ``rng_state()`` / ``set_rng_state()``: torch's, Python's and NumPy's generators, in a form
  a weights-only checkpoint can hold.
- ``EpochProgress``: the steps done and the running sums of the current epoch, so that a
  mid-epoch checkpoint gives the epoch's metrics row exactly as an uninterrupted run would.
- ``GracefulStop``: SIGINT/SIGTERM become a request the loop honours at a consistent point.
"""

from __future__ import annotations

import random
import signal
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .distributed import DistContext, sum_tensor_, sum_values


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The generators a resume restores; on a CUDA ``device`` its generator too (dropout and
    other random ops of the model draw from it there)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()}
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def set_rng_state(state: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Restore ``rng_state()``. A CUDA generator state is restored where the run continues on a
    CUDA device; on the CPU it has nothing to drive (the data's generators are CPU ones)."""
    torch.set_rng_state(state["torch"])
    device = torch.device(device)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class EpochProgress:
    """How far the current epoch got: what a mid-epoch checkpoint must carry for the epoch's
    metrics row to come out exactly as in an uninterrupted run."""

    steps_done: int = 0
    loss_sum: torch.Tensor | None = None  # sum of per-batch loss * batch size (float32)
    correct: torch.Tensor | None = None  # int64
    seen: int = 0
    loader_time: float = 0.0
    train_time: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_sum is None:
            self.loss_sum = torch.zeros(())
        if self.correct is None:
            self.correct = torch.zeros((), dtype=torch.long)

    def to(self, device: torch.device | str) -> EpochProgress:
        """Keep the running sums on the training device (no host synchronisation per step)."""
        self.loss_sum = self.loss_sum.to(device)
        self.correct = self.correct.to(device)
        return self

    def state(self) -> dict[str, Any]:
        return {
            "steps_done": self.steps_done,
            "loss_sum": self.loss_sum.detach().cpu().clone(),
            "correct": self.correct.detach().cpu().clone(),
            "seen": self.seen,
            "loader_time": self.loader_time,
            "train_time": self.train_time,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], steps: int) -> EpochProgress:
        progress = cls(
            steps_done=int(state["steps_done"]),
            loss_sum=state["loss_sum"].to(torch.float32).reshape(()).clone(),
            correct=state["correct"].to(torch.long).reshape(()).clone(),
            seen=int(state["seen"]),
            loader_time=float(state["loader_time"]),
            train_time=float(state["train_time"]),
        )
        if not 0 < progress.steps_done < steps or progress.seen < 1:
            raise ValueError(f"epoch progress {progress.steps_done}/{steps} steps is impossible")
        return progress

    def gather_on_main(self, ctx: DistContext) -> None:
        """Move the sums of all processes into rank 0's (a checkpoint holds global sums)."""
        if not ctx.active:
            return
        sum_tensor_(ctx, self.loss_sum)
        sum_tensor_(ctx, self.correct)
        (seen,) = sum_values(ctx, [self.seen])
        self.seen = int(seen)
        if not ctx.is_main:
            self.loss_sum.zero_()
            self.correct.zero_()
            self.seen = 0


def requested(stop: GracefulStop | None) -> int:
    """The signal number a stop was requested with, or 0."""
    return (stop.signum or 0) if stop is not None else 0


class GracefulStop:
    """While entered, SIGINT and SIGTERM only record a request to stop.

    The loop checks ``signum`` at consistent points and stops there with a checkpoint, so a
    signal never leaves a half-done step. Signals after the first are ignored (torchrun
    forwards the terminal's SIGINT a second time); SIGKILL remains the way to stop at once.
    Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
