"""Run-directory files: weights as safetensors, the training state as a weights-only pickle.

A run directory holds
    config.yaml       the fully resolved TrainConfig
    metrics.jsonl     one JSON line per finished epoch
    summary.json      final and best test error, params, wall time
    model.safetensors the weights after the last finished epoch (what ``eval`` loads)
    checkpoint.pt     everything needed to resume exactly: model, optimizer, epoch, step, RNG
                      states, the loader's position inside the epoch and the epoch's running
                      sums (written at epoch ends, every ``checkpoint_every_steps`` steps and
                      on SIGINT/SIGTERM)
    run.lock          only while a process trains in the directory (an ``flock``)
Each file is replaced atomically, so a crash leaves the previous complete version.
``checkpoint.pt`` is only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..utils.io import atomic_write, atomic_write_text, describe_os_error, read_yaml_mapping


class RunError(Exception):
    """A run directory is missing, unreadable or inconsistent."""


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_weights(path: Path, model: nn.Module) -> None:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"missing weights file {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"cannot read weights {path}: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunError(f"weights in {path} do not fit the configured model: {first}") from e


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunError(
            f"no checkpoint {path}: the run stopped before its first checkpoint; start it "
            f"again with the same --out"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes raise anything from KeyError to struct.error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(
            f"refusing or unable to load checkpoint {path}: {reason} "
            "(only weights-only checkpoints written by attnzoo are accepted)"
        ) from e
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise RunError(f"{path} is not an attnzoo checkpoint")
    return state


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    try:
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise RunError(f"{run_dir} is a file, not a run directory")
        if not Path(run_dir).is_dir():
            raise RunError(f"run directory {run_dir} does not exist")
        if not path.is_file():
            raise RunError(f"{run_dir} is not a run directory (no config.yaml)")
    except OSError as e:  # a name too long, a loop of symlinks, no permission...
        raise RunError(f"cannot read run directory {run_dir}: {describe_os_error(e)}") from e
    return read_yaml_mapping(path, RunError, "run config")


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8 at all
        raise RunError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from e
    if not all(isinstance(row, dict) for row in rows):
        raise RunError(f"{path} is not one JSON object per line")
    return rows
