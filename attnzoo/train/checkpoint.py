"""Run-directory files: weights as safetensors, the training state as a weights-only pickle.

A run directory holds
    config.yaml       the fully resolved TrainConfig
    metrics.jsonl     one JSON line per finished epoch
    summary.json      final and best test error, params, wall time
    model.safetensors the weights after the last finished epoch (what ``eval`` loads)
    model_ema.safetensors  with ``ema_decay``: the weight EMA after that epoch (same keys)
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
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..utils.io import atomic_write, atomic_write_text, describe_os_error, read_yaml_mapping


class RunError(Exception):
    """A run directory is missing, unreadable or inconsistent."""


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    # On the CPU whatever the model's device: the file loads anywhere.
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


WEIGHTS_METADATA_KEY = "attnzoo"


def weights_metadata(**values: Any) -> dict[str, str]:
    """safetensors metadata: one key holding sorted JSON, so that the file's bytes do not
    depend on the order safetensors writes its metadata keys in (a hash map's)."""
    return {WEIGHTS_METADATA_KEY: json.dumps(values, sort_keys=True)}


def read_weights_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """What ``weights_metadata`` wrote (older files: {"epoch": "N"} without precision)."""
    if WEIGHTS_METADATA_KEY in metadata:
        try:
            values = json.loads(metadata[WEIGHTS_METADATA_KEY])
        except ValueError:
            values = None
        if isinstance(values, dict):
            return values
    return {k: v for k, v in metadata.items() if k == "epoch"}


def load_weights(path: Path, model: nn.Module) -> dict[str, str]:
    """Load a run's safetensors weights strictly into ``model``; returns the file's metadata
    (``epoch``, ``precision``). A mismatch names the missing and unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"missing weights file {path}")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"cannot read weights {path}: {e}") from e
    mismatch = describe_key_mismatch(model.state_dict(), state)
    if mismatch:
        raise RunError(f"weights in {path} do not fit the configured model: {mismatch}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same keys, other shapes
        raise RunError(
            f"weights in {path} do not fit the configured model: {summarize_load_error(e)}"
        ) from e
    return metadata


def _key_groups(keys: list[str], universe: list[str], limit: int = 3) -> str:
    """``keys`` (a subset of ``universe``) named briefly: a module all of whose keys are in
    ``keys`` becomes ``module.*`` (its outermost such module); the first ``limit`` names."""
    chosen = set(keys)
    names: list[str] = []
    for key in keys:
        parts = key.split(".")
        name = key
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if all(k in chosen for k in universe if k.startswith(prefix)):
                name = prefix + "*"
                break
        if name not in names:
            names.append(name)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def describe_key_mismatch(expected: dict[str, Any], given: dict[str, Any]) -> str:
    """'' if the keys agree, else e.g. 'missing 27 keys (layer1.0.attention.*, ...);
    unexpected 18 (...)'."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    parts = []
    if missing:
        keys = "key" if len(missing) == 1 else "keys"
        parts.append(f"missing {len(missing)} {keys} ({_key_groups(missing, list(expected))})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({_key_groups(unexpected, list(given))})")
    if parts:
        parts.append("was it trained with another model, attention or options?")
    return "; ".join(parts)


def summarize_load_error(error: RuntimeError, limit: int = 3) -> str:
    """torch's multi-line load_state_dict error as one line: the first ``limit`` reasons."""
    lines = [" ".join(line.split()) for line in str(error).strip().splitlines()[1:]]
    lines = [line.rstrip(".") for line in lines if line]
    if not lines:
        return " ".join(str(error).split())[:300]
    more = f"; ... (+{len(lines) - limit} more)" if len(lines) > limit else ""
    return "; ".join(lines[:limit]) + more


def _on_cpu(value: Any) -> Any:
    """Every tensor of a nested state on the CPU (a GPU run's checkpoint loads anywhere)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = _on_cpu(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunError(
            f"no checkpoint {path}: the run stopped before its first checkpoint; start it "
            f"again with the same --out"
        )
    not_ours = (
        "is corrupt or not an attnzoo checkpoint; resume from an intact copy, or start the "
        "run again in a new --out"
    )
    try:
        is_archive = zipfile.is_zipfile(path)
    except OSError as e:
        raise RunError(f"cannot read checkpoint {path}: {describe_os_error(e)}") from e
    if not is_archive:  # torch.save has written zip archives since torch 1.6
        raise RunError(f"checkpoint {path} {not_ours} (not a torch zip archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A well-formed file holding objects a weights-only load refuses: never offer to load
        # it unsafely (torch's own message suggests weights_only=False).
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it holds {refused.group(1)})" if refused else ""
        raise RunError(
            f"checkpoint {path} holds objects other than tensors and plain values{what}: it was "
            f"not written by attnzoo, which loads checkpoints weights-only and will not run "
            f"code from them"
        ) from e
    except Exception as e:  # garbage inside the archive raises anything from KeyError on
        raise RunError(f"checkpoint {path} {not_ours} ({type(e).__name__})") from e
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
