"""The training loop: ``train(config, out)``, ``resume(run_dir)``, ``evaluate(...)``."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import InMemoryLoader, load_dataset
from ..data.datasets import ImageDataset
from ..registry import create_model
from ..utils.io import atomic_write_json, atomic_write_yaml
from .checkpoint import (
    RunError,
    load_checkpoint,
    load_weights,
    read_config,
    read_metrics,
    save_checkpoint,
    save_weights,
    write_metrics,
)
from .config import TrainConfig
from .loss import main_logits, training_loss
from .schedule import learning_rate


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    return create_model(
        cfg.model,
        num_classes=num_classes,
        attention=cfg.attention,
        attention_kwargs=cfg.attention_kwargs,
        **cfg.model_kwargs,
    )


def make_loaders(cfg: TrainConfig, data: ImageDataset) -> tuple[InMemoryLoader, InMemoryLoader]:
    train_images, train_labels = data.train.images, data.train.labels
    if cfg.train_subset:
        train_images, train_labels = (
            train_images[: cfg.train_subset],
            train_labels[: cfg.train_subset],
        )
    common = dict(mean=data.mean, std=data.std, channels_last=cfg.channels_last)
    train = InMemoryLoader(
        train_images,
        train_labels,
        cfg.batch_size,
        train=True,
        pad=data.pad,
        flip=data.flip,
        seed=cfg.seed,
        **common,
    )
    test = InMemoryLoader(data.test.images, data.test.labels, max(cfg.batch_size, 256), **common)
    return train, test


@torch.no_grad()
def evaluate(model: nn.Module, loader: InMemoryLoader) -> dict[str, float]:
    """Top-1 / top-5 error (%) and mean loss over the loader."""
    model.eval()
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        top1 += hit[:, 0].sum().item()
        top5 += hit.any(dim=1).sum().item()
        total += y.numel()
    return {
        "test_loss": loss_sum / total,
        "test_top1_err": 100.0 * (1 - top1 / total),
        "test_top5_err": 100.0 * (1 - top5 / total),
    }


def _rng_state(loader: InMemoryLoader) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "loader": loader.generator.get_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
    }


def _numpy_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _set_rng_state(state: dict[str, Any], loader: InMemoryLoader) -> None:
    torch.set_rng_state(state["torch"])
    loader.generator.set_state(state["loader"])
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


class Trainer:
    """One training run in one run directory."""

    def __init__(self, cfg: TrainConfig, out: Path, data: ImageDataset | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir)
        self.model = build_model(cfg, self.data.num_classes)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.params = count_parameters(self.model)
        self.train_loader, self.test_loader = make_loaders(cfg, self.data)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        self.epoch = 0  # epochs finished
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.wall_time = 0.0

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "wall_time": self.wall_time,
            "rng": _rng_state(self.train_loader),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            self.wall_time = float(state.get("wall_time", 0.0))
            _set_rng_state(state["rng"], self.train_loader)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise RunError(f"checkpoint does not match this run: {e}") from e

    def save(self) -> None:
        # checkpoint.pt goes last: it is what resume trusts, so the files written before it
        # are never behind it (a crash in between only repeats that epoch's writes).
        save_weights(self.out / "model.safetensors", self.model, {"epoch": str(self.epoch)})
        write_metrics(self.out, self.metrics)
        save_checkpoint(self.out / "checkpoint.pt", self.state_dict())

    # ------------------------------------------------------------ loop
    def train_epoch(self) -> dict[str, float]:
        cfg, model, loader = self.cfg, self.model, self.train_loader
        model.train()
        steps = len(loader)
        loss_sum = torch.zeros(())
        correct = torch.zeros((), dtype=torch.long)
        seen = 0
        load_time = 0.0
        start = time.perf_counter()
        show = cfg.progress if cfg.progress is not None else None
        bar = tqdm(
            total=steps,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=(not show) if show is not None else None,
        )
        it = iter(loader)
        for i in range(steps):
            t0 = time.perf_counter()
            x, y = next(it)
            load_time += time.perf_counter() - t0
            lr = learning_rate(cfg, self.epoch + i / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            output = model(x)
            loss = training_loss(output, y)
            logits = main_logits(output)
            if not torch.isfinite(loss):
                raise RunError(
                    f"loss is {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1}; "
                    f"stopping (the last good checkpoint in {self.out} is kept)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
            elapsed = time.perf_counter() - start
            bar.update()
            if i % 10 == 0 or i == steps - 1:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{100 * correct.item() / seen:.1f}",
                    img_s=f"{seen / elapsed:.0f}",
                )
        bar.close()
        train_time = time.perf_counter() - start
        return {
            "train_loss": loss_sum.item() / seen,
            "train_acc": 100.0 * correct.item() / seen,
            "lr": lr,
            "train_time": train_time,
            "loader_time": load_time,
            "images_per_s": seen / train_time,
        }

    def fit(self, log=print) -> dict[str, Any]:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            row.update(evaluate(self.model, self.test_loader))
            row["epoch_time"] = time.perf_counter() - t0
            self.wall_time += row["epoch_time"]
            self.epoch += 1
            self.metrics.append(row)
            self.save()
            log(
                f"epoch {row['epoch']}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"train acc {row['train_acc']:.2f}%  test err {row['test_top1_err']:.2f}% "
                f"(top-5 {row['test_top5_err']:.2f}%)  lr {row['lr']:.4g}  "
                f"{row['epoch_time']:.1f}s  {row['images_per_s']:.0f} img/s"
            )
        summary = self.summary()
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def summary(self) -> dict[str, Any]:
        best = min(self.metrics, key=lambda r: r["test_top1_err"])
        last = self.metrics[-1]
        return {
            "model": self.cfg.model,
            "attention": self.cfg.attention,
            "dataset": self.cfg.dataset,
            "seed": self.cfg.seed,
            "epochs": self.epoch,
            "params": self.params,
            "final_top1_err": last["test_top1_err"],
            "final_top5_err": last["test_top5_err"],
            "best_top1_err": best["test_top1_err"],
            "best_epoch": best["epoch"],
            "wall_time": self.wall_time,
            "loader_share": sum(r["loader_time"] for r in self.metrics)
            / max(sum(r["train_time"] for r in self.metrics), 1e-9),
        }


def _check_fresh(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    # A run counts once it has a checkpoint; a run that died in its first epoch (config.yaml
    # only) is simply started again.
    if out.is_dir() and (out / "checkpoint.pt").exists():
        raise RunError(
            f"{out} already holds a run; continue it with --resume {out} or choose another --out"
        )


def train(cfg: TrainConfig, out: str | os.PathLike, log=print) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` (which must not hold another run)."""
    out = Path(out)
    cfg.validate()
    _check_fresh(out)
    trainer = Trainer(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(out / "config.yaml", cfg.to_dict())
    log(
        f"{cfg.model} + {cfg.attention or 'no attention'} on {cfg.dataset}: "
        f"{trainer.params:,} parameters, {trainer.train_loader.num_samples} training images, "
        f"{cfg.epochs} epochs -> {out}"
    )
    return trainer.fit(log)


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    try:
        return TrainConfig.from_dict(read_config(Path(run_dir))).validate()
    except ValueError as e:
        raise RunError(f"{run_dir}/config.yaml: {e}") from e


def resume(run_dir: str | os.PathLike, log=print) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt")
    trainer = Trainer(cfg, run_dir)
    trainer.load_state_dict(state)
    trainer.metrics = read_metrics(run_dir)[: trainer.epoch]
    log(f"resuming {run_dir} after epoch {trainer.epoch}/{cfg.epochs}")
    if trainer.epoch >= cfg.epochs:
        trainer.save()  # the crash may have come between the final writes
        summary = trainer.summary()
        atomic_write_json(run_dir / "summary.json", summary)
        return summary
    return trainer.fit(log)


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | None = None) -> dict[str, Any]:
    """Re-evaluate the saved weights of a run on its test set."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_dir:
        cfg.data_dir = data_dir
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    model = build_model(cfg, data.num_classes)
    load_weights(run_dir / "model.safetensors", model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, test = make_loaders(cfg, data)
    result = evaluate(model, test)
    result.update(params=count_parameters(model), images=test.num_samples)
    return result


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True)
