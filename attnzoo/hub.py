"""Sharing a run: ``attnzoo export RUN_DIR OUT_DIR`` in the Hugging Face Hub layout.

``export_run(run_dir, out_dir)`` writes a directory that can be pushed to the Hub as a model
repository as it is:

    model.safetensors  the run's final weights (attnzoo key names)
    config.json        what ``create_model`` needs (model, num_classes, attention,
                       attention_kwargs, model_kwargs), the attnzoo version, the dataset, the
                       input size and normalisation, the measured results, the full config
    README.md          a model card: results, how to load it, the recipe, the command that
                       trained it

``load_pretrained(out_dir)`` builds the model from ``config.json`` alone and loads it;
``create_model(name, ..., pretrained=out_dir)`` loads it into a model built by hand (a new
attention or head on the exported backbone, see ``pretrained.py``).

Only a finished run (with ``summary.json``) is exported, since its results describe the
weights. The directory appears complete or not at all: everything is written into a temp
directory beside ``out_dir`` and renamed into place. An existing non-empty ``out_dir`` is
refused unless ``force=True``; then the old directory is moved aside, the new one renamed in
and the old one deleted (if the second rename fails, the old one is moved back).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save
from torch import nn

from .pretrained import EXPORT_CONFIG, EXPORT_WEIGHTS, read_export_config
from .train.checkpoint import RunError, load_weights, read_metrics, read_weights_metadata
from .train.config import TrainConfig, load_recipe
from .train.engine import count_parameters, load_run_config
from .utils.text import plural

CARD = "README.md"
FORMAT_VERSION = 1
# Config keys that describe the machine a run used, not its recipe.
LOCAL_KEYS = ("data_dir", "progress")
# Always on the reproduce command line (for the reader), in this order.
SHOWN_FLAGS = ("model", "attention", "dataset", "epochs", "seed")
MAX_EPOCH_ROWS = 30


# --- reading the run ------------------------------------------------------------------------


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunError(
            f"{run_dir} has not finished (no summary.json), so it has no results to publish; "
            f"finish it with `attnzoo train --resume {run_dir}`"
        )
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(summary, dict) or "final_top1_err" not in summary:
        raise RunError(f"{path} is not an attnzoo run summary")
    return summary


def _num_classes(cfg: TrainConfig, state: dict[str, torch.Tensor]) -> int:
    """The class count the run's model was built with, read off its classifier."""
    from .pretrained import classifier_classes, classifier_prefix
    from .registry import create_model

    with torch.device("meta"):
        model = create_model(
            cfg.model,
            attention=cfg.attention,
            attention_kwargs=cfg.attention_kwargs,
            **cfg.model_kwargs,
        )
    classes = classifier_classes(state, classifier_prefix(model))
    if classes is None:
        raise RunError(f"the weights of {cfg.model} have no classifier: not this run's model")
    return classes


def _load_run_model(run_dir: Path, cfg: TrainConfig) -> tuple[nn.Module, int, dict[str, Any]]:
    """The run's model with its final weights (checked strictly), its class count and the
    weights' metadata (epoch, precision)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .registry import create_model

    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise RunError(f"{run_dir} has no weights (model.safetensors); was the run finished?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"cannot read weights {path}: {e}") from e
    num_classes = _num_classes(cfg, state)
    model = create_model(
        cfg.model,
        num_classes=num_classes,
        attention=cfg.attention,
        attention_kwargs=cfg.attention_kwargs,
        **cfg.model_kwargs,
    )
    metadata = read_weights_metadata(load_weights(path, model))
    return model, num_classes, metadata


def _preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """Input size and normalisation of the run's test images, where known without the data."""
    from .data.datasets import CIFAR_STATS
    from .data.folder import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

    def result(size: int, mean: Any, std: Any, transform: str) -> dict[str, Any]:
        return {
            "input_size": [3, size, size],
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std],
            "eval_transform": transform,
        }

    scale = "pixels scaled to [0, 1], then (x - mean) / std per channel"
    if cfg.dataset in CIFAR_STATS:
        return result(32, *CIFAR_STATS[cfg.dataset], f"32x32 RGB, {scale}")
    if cfg.dataset == "imagenet":
        size = cfg.image_size or DEFAULT_IMAGE_SIZE
        resize = round(size * 256 / 224)
        text = f"shorter side resized to {resize} (bilinear), centre crop {size}, {scale}"
        return result(size, IMAGENET_MEAN, IMAGENET_STD, text)
    if cfg.dataset == "digits":  # bundled with scikit-learn: no download
        from .data import load_dataset

        data = load_dataset("digits")
        side = data.image_size[0]
        return result(side, data.mean, data.std, f"{side}x{side} grey copied to RGB, {scale}")
    if cfg.dataset == "stl10":
        text = f"96x96 RGB, {scale}; mean/std are those of the run's 9,100 training images"
        return result(96, None, None, text)
    return {"input_size": None, "mean": None, "std": None, "eval_transform": None}


def train_command(cfg: TrainConfig) -> str:
    """An ``attnzoo train`` command line that resolves to ``cfg`` (its local settings,
    ``data_dir`` and ``progress``, aside)."""
    values = cfg.to_dict()
    base = dataclasses.asdict(TrainConfig())
    try:
        base.update(load_recipe(cfg.recipe))
    except ValueError:  # a recipe file that is gone: spell out every setting
        pass
    argv = ["attnzoo", "train", "--recipe", cfg.recipe]
    for key in SHOWN_FLAGS:
        value = values[key]
        argv += [f"--{key}", "none" if value is None else str(value)]
    if cfg.attention_kwargs:
        argv += ["--attention-kwargs", json.dumps(cfg.attention_kwargs, sort_keys=True)]
    if cfg.model_kwargs:
        argv += ["--model-kwargs", json.dumps(cfg.model_kwargs, sort_keys=True)]
    done = {*SHOWN_FLAGS, *LOCAL_KEYS, "recipe", "attention_kwargs", "model_kwargs"}
    for key, value in values.items():
        if key not in done and value != base.get(key):
            argv.append(f"--set={key}={json.dumps(value)}")
    return shlex.join(argv)


def export_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], nn.Module]:
    """config.json's content for the finished run in ``run_dir``, and the run's model with its
    final weights. Raises ``RunError`` for a missing, unfinished or inconsistent run."""
    from . import __version__

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    summary = _read_summary(run_dir)
    metrics = read_metrics(run_dir)
    model, num_classes, metadata = _load_run_model(run_dir, cfg)
    epoch = metadata.get("epoch")
    if epoch is not None and int(epoch) != summary.get("epochs"):
        raise RunError(
            f"{run_dir}: the weights are from epoch {epoch} but summary.json reports "
            f"{summary.get('epochs')} epochs; finish the run with `attnzoo train --resume "
            f"{run_dir}`"
        )
    results = {
        k: summary.get(k)
        for k in (
            "final_top1_err",
            "final_top5_err",
            "best_top1_err",
            "best_epoch",
            "epochs",
            "precision",
            "wall_time",
        )
    }
    results["params"] = count_parameters(model)
    results["test_images"] = cfg.test_subset  # None: the whole test set
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_KEYS}
    config = {
        "library": "attnzoo",
        "attnzoo_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "num_classes": num_classes,
        "attention": cfg.attention,
        "attention_kwargs": dict(cfg.attention_kwargs),
        "model_kwargs": dict(cfg.model_kwargs),
        "dataset": cfg.dataset,
        **_preprocessing(cfg),
        "results": results,
        "epoch_errors": [
            [row.get("epoch"), row.get("test_top1_err")] for row in metrics if "epoch" in row
        ],
        "machine": summary.get("machine"),
        "train_config": recipe,
        "train_command": train_command(cfg),
    }
    return config, model


# --- the model card -------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def model_card(config: dict[str, Any]) -> str:
    """README.md for an export: Hub metadata, results, usage, recipe, command."""
    r = config["results"]
    attention = config["attention"]
    title = f"{config['model']} + {attention or 'no attention'} on {config['dataset']}"
    tags = ["image-classification", "attnzoo", config["model"]] + ([attention] if attention else [])
    front = yaml.safe_dump(
        {
            "library_name": "attnzoo",
            "tags": tags,
            "datasets": [config["dataset"]],
            "metrics": ["accuracy"],
        },
        sort_keys=False,
    )
    n = r["test_images"]
    images = "the whole test set" if n is None else f"its first {n} images"
    accuracy = None if r["final_top1_err"] is None else 100 - r["final_top1_err"]
    machine = config.get("machine") or {}
    where = f" on {machine.get('cpu')}" if machine.get("cpu") else ""
    lines = [
        f"---\n{front}---",
        "",
        f"# {title}",
        "",
        (
            f"`{config['model']}` with `{attention}` attention"
            if attention
            else f"`{config['model']}`"
        )
        + f" ({r['params']:,} parameters, {config['num_classes']} classes), trained for "
        f"{plural(r['epochs'], 'epoch')} with the `{config['train_config']['recipe']}` recipe by "
        f"attnzoo {config['attnzoo_version']}.",
        "",
        "## Results",
        "",
        f"Measured by the training run on the {config['dataset']} test set ({images}). "
        "The weights here are those after the last epoch.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| top-1 accuracy | {_pct(accuracy)} |",
        f"| top-1 error | {_pct(r['final_top1_err'])} |",
        f"| top-5 error | {_pct(r['final_top5_err'])} |",
        f"| best top-1 error during training | {_pct(r['best_top1_err'])} (epoch {r['best_epoch']}) |",
        f"| parameters | {r['params']:,} |",
        f"| precision (autocast) | {r['precision']} |",
    ]
    if r.get("wall_time") is not None:
        lines.append(f"| training time | {r['wall_time']:.1f} s{where} |")
    rows = config.get("epoch_errors") or []
    if rows:
        lines += ["", "| epoch | test top-1 error |", "| --- | --- |"]
        shown = rows if len(rows) <= MAX_EPOCH_ROWS else rows[-MAX_EPOCH_ROWS:]
        lines += [f"| {epoch} | {_pct(err)} |" for epoch, err in shown]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import attnzoo.hub",
        "",
        'model = attnzoo.hub.load_pretrained("path/to/this/directory").eval()',
        "```",
        "",
        "As a backbone for another attention or head (the missing tensors are listed in "
        "`model.pretrained_report`):",
        "",
        "```python",
        "import attnzoo",
        "",
        f"model = attnzoo.create_model({config['model']!r}, num_classes=NEW, "
        f"{', '.join(f'{k}={v!r}' for k, v in config['model_kwargs'].items()) + ', ' if config['model_kwargs'] else ''}"
        'pretrained="path/to/this/directory")',
        "```",
        "",
    ]
    if config.get("input_size"):
        _, h, w = config["input_size"]
        lines.append(f"Input: {h}x{w} images; {config['eval_transform']}.")
        if config.get("mean"):
            mean = ", ".join(f"{v:.4f}" for v in config["mean"])
            std = ", ".join(f"{v:.4f}" for v in config["std"])
            lines.append(f"mean = ({mean}), std = ({std}).")
        lines.append("")
    lines += [
        "## Training recipe",
        "",
        "```yaml",
        yaml.safe_dump(config["train_config"], sort_keys=False).rstrip(),
        "```",
        "",
        "## Reproduce",
        "",
        "```sh",
        config["train_command"],
        "```",
        "",
    ]
    return "\n".join(lines)


# --- writing --------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(
            f"{out_dir} exists and is not empty; choose another OUT_DIR, or pass --force "
            "(force=True) to replace it"
        )


def _write_files(directory: Path, config: dict[str, Any], model: nn.Module) -> None:
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    files = {
        EXPORT_WEIGHTS: save(tensors, metadata={"format": "pt"}),
        EXPORT_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
        CARD: model_card(config).encode(),
    }
    for name, data in files.items():
        with open(directory / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` (already allowed by
    ``_check_out_dir``) is moved aside first and deleted after."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # onto nothing or an empty directory: one atomic rename
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / out_dir.name, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False
) -> dict[str, Any]:
    """Export the finished run in ``run_dir`` to ``out_dir`` (model.safetensors, config.json,
    README.md); returns the config written. ``out_dir`` must not exist or be empty, unless
    ``force``. Either the whole directory appears, or (on any error) nothing changes."""
    run_dir, out_dir = Path(run_dir), Path(out_dir).expanduser()
    _check_out_dir(out_dir, force)
    config, model = export_config(run_dir)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise RunError(f"cannot write to {parent}: {e}") from e
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _write_files(tmp, config, model)
        _check_out_dir(out_dir, force)  # again: another process may have written meanwhile
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_pretrained(path: str | os.PathLike) -> nn.Module:
    """The model an ``attnzoo export`` directory holds, built from its config.json and loaded
    strictly (``model.pretrained_report`` lists what was loaded)."""
    from .registry import create_model

    config = read_export_config(path)
    model = create_model(
        config["model"],
        num_classes=config.get("num_classes"),
        attention=config.get("attention"),
        attention_kwargs=config["attention_kwargs"],
        pretrained=path,
        **config["model_kwargs"],
    )
    report = model.pretrained_report
    if report.missing_attention or report.new_classifier:
        raise ValueError(
            f"{path}: model.safetensors does not hold every tensor of the model its config.json "
            f"describes (missing: {', '.join((report.missing_attention + report.new_classifier)[:5])})"
        )
    return model
