"""Helpers for the reliability tests: tiny runs in subprocesses, run comparisons, leftovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

# Fields that measure time, not training: they differ between any two runs.
TIMING_KEYS = {
    "epoch_time",
    "train_time",
    "loader_time",
    "images_per_s",
    "wall_time",
    "loader_share",
}

# resnet20 (no attention) on 256 digits, batch 32: 8 steps per epoch, 24 in all, with a
# checkpoint every 3 steps; about 2 s of training on one thread.
TINY = [
    "--dataset", "digits", "--model", "resnet20", "--recipe", "digits", "--epochs", "3",
    "--train-subset", "256", "--batch-size", "32", "--threads", "1", "--no-progress",
    "--checkpoint-every-steps", "3",
]  # fmt: skip


# The same run as a TrainConfig (resolve_config("digits", **TINY_CONFIG)): resnet20 on 64
# digits, batch 32, 2 steps per epoch, 2 epochs.
TINY_CONFIG = dict(
    dataset="digits",
    model="resnet20",
    epochs=2,
    train_subset=64,
    test_subset=32,
    batch_size=32,
    threads=1,
    progress=False,
)


def attnzoo(*args: object) -> list[str]:
    """The command line of ``python -m attnzoo ARGS`` in this interpreter."""
    return [sys.executable, "-m", "attnzoo", *(str(a) for a in args)]


def start(*args: object, **kwargs) -> subprocess.Popen:
    """Start ``attnzoo ARGS`` in the background, output captured as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        attnzoo(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


class BackgroundRun:
    """A reference run started at once and waited for only when its result is needed."""

    def __init__(self, out: Path, *args: object) -> None:
        self.out = out
        self.proc = start("train", *args, "--out", out)

    def result(self) -> Path:
        stdout, stderr = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, stderr
        return self.out


def checkpoint_version(run: Path) -> tuple[int, int] | None:
    """Identity of the current checkpoint.pt: every atomic save makes a new inode."""
    try:
        st = os.stat(run / "checkpoint.pt")
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_saves(proc: subprocess.Popen, run: Path, count: int, timeout: float = 300) -> int:
    """Poll until ``count`` new checkpoint versions appeared (or ``proc`` ended); returns how
    many were seen."""
    seen, last = 0, checkpoint_version(run)
    deadline = time.monotonic() + timeout
    while seen < count and proc.poll() is None:
        version = checkpoint_version(run)
        if version is not None and version != last:
            seen, last = seen + 1, version
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"no checkpoint in {run} after {timeout} s")
        time.sleep(0.001)
    return seen


def kill_after_saves(proc: subprocess.Popen, run: Path, count: int, delay: float) -> dict:
    """SIGKILL ``proc`` ``delay`` seconds after its ``count``-th checkpoint save.

    Returns where the run directory's checkpoint stood after the kill (for messages).
    """
    wait_for_saves(proc, run, count)
    time.sleep(delay)
    proc.kill()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr}"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    progress = state.get("progress")
    return {
        "epoch": state["epoch"],
        "step": state["step"],
        "steps_into_epoch": progress["steps_done"] if progress else 0,
        "temp_files": [p.name for p in run.glob(".*.tmp")],
    }


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise the same weights, metrics and summary (timing fields aside)."""
    assert (run / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()
    assert [without_timing(r) for r in rows(run)] == [without_timing(r) for r in rows(reference)]
    summary = json.loads((run / "summary.json").read_text())
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert without_timing(summary) == without_timing(ref_summary)


def weight_differences(run: Path, reference: Path) -> tuple[float, float]:
    """(largest absolute difference of a parameter, largest relative difference in norm of a
    batch-norm running statistic) between two runs' final weights."""
    a, b = (
        load_file(str(run / "model.safetensors")),
        load_file(str(reference / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    params, stats = 0.0, 0.0
    for name in a:
        x, y = a[name].double(), b[name].double()
        if "running_" in name:
            stats = max(stats, ((x - y).norm() / y.norm()).item())
        elif "num_batches_tracked" in name:
            assert torch.equal(x, y), name
        else:
            params = max(params, (x - y).abs().max().item())
    return params, stats


def leftovers(run: Path) -> list[str]:
    """Files a finished or stopped run must not leave: temp files and the lock."""
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == "run.lock")
