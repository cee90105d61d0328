"""Pictures of trained runs (``attnzoo visualize``; docs/visualize.md).

``visualize(runs, images, out)`` loads each run directory (config.yaml and
model.safetensors), picks the same ``images`` test images for every run (a seeded choice)
and writes into ``out``:

- ``gradcam.png``: Grad-CAM at the last stage of each run, side by side (``gradcam.py``);
- ``attention_maps.png``: the spatial maps of the last attention module per stage
  (``maps.py``), for the runs that have some;
- ``channel_weights.png``: channel-attention weights of the same modules, as bar plots;
- ``curves_<run>.png``: each run's training curves from metrics.jsonl.

``figures.py`` draws them. Files are replaced atomically.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import load_dataset
from ..data.datasets import ImageDataset
from ..train.checkpoint import RunError, load_weights, read_metrics
from ..train.config import TrainConfig
from ..utils.io import check_writable, describe_os_error
from .figures import (
    BarCell,
    CamColumn,
    MapColumn,
    attention_figure,
    channel_figure,
    curves_figure,
    gradcam_figure,
    save_png,
)
from .gradcam import METHODS, grad_cam
from .maps import read_attention, upsample

MAX_IMAGES = 32  # one grid row per image
CAM_CLASSES = ("true", "predicted")
WEIGHTS = "model.safetensors"

__all__ = [
    "MAX_IMAGES",
    "LoadedRun",
    "check_run_dir",
    "load_run",
    "normalise",
    "pick_images",
    "visualize",
]


@dataclass
class LoadedRun:
    path: Path
    config: TrainConfig
    model: nn.Module | None = None
    label: str = ""  # model+attention, as the pictures title it


def _label(cfg: TrainConfig) -> str:
    label = f"{cfg.model}+{cfg.attention or 'none'}"
    options = {**cfg.attention_kwargs, **cfg.model_kwargs}
    if options:
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
    return label


def check_run_dir(run: str | os.PathLike) -> Path:
    """The run directory, if it exists and holds weights; else a one-line ValueError."""
    path = Path(run)
    if not str(run).strip():
        raise ValueError("--run is empty; give a run directory")
    if not path.is_dir():
        raise ValueError(f"run directory {run} does not exist")
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"{run} has no {WEIGHTS}: the run has not finished an epoch")
    return path


def load_run(path: Path, data: ImageDataset) -> LoadedRun:
    """Build the run's model, load its weights, eval mode."""
    from ..train.engine import build_model, load_run_config

    run = LoadedRun(path, load_run_config(path))
    run.model = build_model(run.config, data.num_classes)
    load_weights(path / WEIGHTS, run.model)
    run.model.eval()
    run.label = _label(run.config)
    return run


def pick_images(data: ImageDataset, count: int, seed: int) -> np.ndarray:
    """Indices of ``count`` test images, a seeded choice without repeats, in split order."""
    total = len(data.test.labels)
    if count > total:
        raise ValueError(f"--images {count}: the {data.name} test split has only {total} images")
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def normalise(data: ImageDataset, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the model's input (N, 3, H, W), as the loaders normalise it."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _unique_labels(runs: list[LoadedRun]) -> None:
    """Runs that would share a title get their directory name added."""
    for run in runs:
        if sum(r.label == run.label for r in runs) > 1:
            run.label += f" [{run.path.name}]"


def _curves_name(run: LoadedRun, taken: set[str]) -> str:
    path = run.path.resolve()
    # reproduce's runs are <row>/seed<k>: name the file after both.
    base = f"{path.parent.name}_{path.name}" if re.fullmatch(r"seed\d+", path.name) else path.name
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)
    name, k = f"curves_{stem}.png", 2
    while name in taken:
        name, k = f"curves_{stem}-{k}.png", k + 1
    taken.add(name)
    return name


def visualize(
    runs: list[str | os.PathLike],
    images: int,
    out: str | os.PathLike | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    method: str = "gradcam",
    cam_class: str = "true",
    device: str = "auto",
) -> dict[str, Any]:
    """Write the PNGs for ``runs`` (see the module docstring) and say what was written; the
    models run on ``device`` (auto, cpu, cuda, cuda:N), the figures are drawn on the CPU.

    Returns ``{"written": [paths], "skipped": [reasons], "indices": test indices shown}``.
    """
    if not runs:
        raise ValueError("give at least one --run")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"--images must be a positive int, got {images!r}")
    if images > MAX_IMAGES:
        raise ValueError(f"--images must be at most {MAX_IMAGES} (one row each), got {images}")
    if method not in METHODS:
        raise ValueError(f"unknown --method {method!r}; choose one of: {', '.join(METHODS)}")
    if cam_class not in CAM_CLASSES:
        raise ValueError(f"--cam-class must be one of: {', '.join(CAM_CLASSES)}")
    from ..train.engine import load_run_config
    from ..train.fastpath import resolve_device

    where = resolve_device(device)
    paths = [check_run_dir(r) for r in runs]
    configs = [load_run_config(p) for p in paths]
    datasets = sorted({c.dataset for c in configs})
    if len(datasets) > 1:
        listing = ", ".join(f"{p} ({c.dataset})" for p, c in zip(paths, configs, strict=True))
        raise ValueError(f"runs are on different datasets: {listing}; compare runs of one dataset")
    try:
        data = load_dataset(configs[0].dataset, data_dir or configs[0].data_dir)
    except OSError as e:
        raise RunError(f"cannot load {configs[0].dataset}: {' '.join(str(e).split())}") from e
    if not isinstance(data, ImageDataset):  # a folder dataset: no test arrays to pick from
        raise ValueError(
            f"visualize reads in-memory datasets only (digits, cifar10, cifar100, stl10), not "
            f"{configs[0].dataset}"
        )
    out = Path(out) if out is not None else paths[0] / "viz"
    try:
        check_writable(out)  # before the work, not after it
    except OSError as e:
        raise RunError(f"cannot write to --out {out}: {describe_os_error(e)}") from e
    loaded = [load_run(p, data) for p in paths]
    for run in loaded:
        run.model.to(where)
    _unique_labels(loaded)

    indices = pick_images(data, images, seed)
    pictures = data.test.images[indices]
    labels = [int(v) for v in data.test.labels[indices]]
    x = normalise(data, pictures).to(where)
    size = tuple(pictures.shape[1:3])

    cam_columns, map_columns, bar_rows = [], [], []
    for run in loaded:
        readout = read_attention(run.model, x)
        predicted = [int(v) for v in readout.logits.argmax(dim=1)]
        targets = labels if cam_class == "true" else predicted
        heat = grad_cam(run.model, x, targets, method)
        cam_columns.append(CamColumn(run.label, heat, predicted))
        for m in readout.spatial:
            title = f"{run.label}\n{m.stage or m.module}: {m.name}"
            map_columns.append(MapColumn(title, upsample(m.values, size).numpy()))
        if readout.channel:
            bar_rows.append(
                [
                    BarCell(f"{run.label}\n{w.stage or w.module}", w.values.numpy())
                    for w in readout.channel
                ]
            )

    written, skipped = [], []

    def write(fig, name: str) -> None:
        try:
            written.append(save_png(fig, out / name))
        except OSError as e:
            raise RunError(f"cannot write {out / name}: {describe_os_error(e)}") from e

    what = "Grad-CAM" if method == "gradcam" else "Grad-CAM++"
    target = "true class" if cam_class == "true" else "predicted class"
    names = getattr(data, "classes", None)
    write(
        gradcam_figure(pictures, labels, cam_columns, f"{what} of the {target}", names),
        "gradcam.png",
    )
    if map_columns:
        write(attention_figure(pictures, labels, map_columns, names), "attention_maps.png")
    else:
        skipped.append("attention_maps.png: no run has an attention module with a spatial map")
    if bar_rows:
        write(channel_figure(bar_rows), "channel_weights.png")
    else:
        skipped.append("channel_weights.png: no run has a channel attention")
    taken: set[str] = set()
    for run in loaded:
        metrics = read_metrics(run.path)
        if not metrics:
            skipped.append(f"curves of {run.path}: metrics.jsonl is missing or empty")
            continue
        title = f"{run.label}: {run.path}"
        write(curves_figure(title, metrics), _curves_name(run, taken))
    return {"written": written, "skipped": skipped, "indices": [int(i) for i in indices]}
