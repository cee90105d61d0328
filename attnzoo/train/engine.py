"""The training loop: ``train(config, out)``, ``resume(run_dir)``, ``evaluate(...)``.

Reliability (docs/reliability.md has the user's view):

- Exact resume. ``checkpoint.pt`` holds the model, optimizer, step, every RNG and the
  loader's position inside the epoch, plus the epoch's running loss/accuracy sums, so a run
  resumed from any checkpoint (end of an epoch, every ``checkpoint_every_steps`` steps, or
  the one written on SIGINT/SIGTERM) produces bitwise the same weights and metrics as one
  that never stopped.
- Signals. SIGINT/SIGTERM do not kill the run mid-step: training stops at the end of the
  current step (or, on an epoch's last step, after that epoch's evaluation and save), writes
  a checkpoint and raises ``Interrupted``; the CLI prints how to resume and exits 130/143.
- One process per run directory: rank 0 holds ``run.lock`` (an ``flock``) while it trains.
- Failed writes (a full disk, a read-only mount) become one-line ``RunError``s; every file
  is replaced atomically, so the previous checkpoint survives.
- Data parallel (``distributed.py``): every process runs this loop on its share of each
  batch; decisions are taken together, only rank 0 writes.

Beside it: ``progress.py`` (RNG state, the epoch's progress, graceful stop), ``rundir.py``
(the run directory's lock and checks), ``checkpoint.py`` (the files), ``fastpath.py``
(device and precision policy), ``optim.py``, ``mixing.py``, ``ema.py``, ``loss.py``,
``schedule.py`` and ``loggers.py``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import kernels
from ..data import Dataset, Loader, LoaderSettings, load_dataset
from ..data.augment import attach_augment, build_augment
from ..data.folder import default_workers
from ..registry import create_model
from ..utils.io import (
    atomic_write_json,
    atomic_write_yaml,
    describe_os_error,
)
from ..utils.machine import machine_info
from ..utils.text import plural
from .checkpoint import (
    RunError,
    load_checkpoint,
    load_weights,
    read_config,
    read_metrics,
    read_weights_metadata,
    save_checkpoint,
    save_weights,
    weights_metadata,
    write_metrics,
)
from .config import TrainConfig
from .distributed import (
    SINGLE,
    DistContext,
    convert_sync_batchnorm,
    default_threads,
    from_env,
    max_of,
    on_main,
    signal_name,
    sum_values,
    wrap,
)
from .ema import build_ema
from .fastpath import (
    MIN_COMPILED_STEPS,
    SYNC_EVERY,
    autocast,
    compile_saving,
    compiled,
    configure_device,
    decide_compile,
    decide_precision,
    device_info,
    estimated_step_seconds,
    grad_scaler,
    macs_per_image,
    resolve_device,
)
from .loggers import RunLoggers, require_loggers
from .loss import main_logits, training_loss
from .mixing import build_mixing
from .optim import build_optimizer
from .progress import EpochProgress, GracefulStop, requested, rng_state, set_rng_state
from .rundir import claimed_run_dir
from .schedule import learning_rate


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def quiet(message: str) -> None:
    pass


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_data(cfg: TrainConfig) -> Dataset:
    """The configured dataset; a file-system failure under the data root is one RunError."""
    try:
        return load_dataset(cfg.dataset, cfg.data_dir)
    except OSError as e:
        where = f" under --data-dir {cfg.data_dir}" if cfg.data_dir else ""
        raise RunError(f"cannot load {cfg.dataset}{where}: {one_line(e)}") from e


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


def make_loaders(
    cfg: TrainConfig, data: Dataset, ctx: DistContext = SINGLE
) -> tuple[Loader, Loader]:
    """Training and test loaders; with several processes each takes its slice of every batch."""
    settings = LoaderSettings(
        batch_size=cfg.batch_size,
        test_batch_size=max(cfg.batch_size, 256),
        seed=cfg.seed,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
        channels_last=cfg.channels_last,
        rank=ctx.rank,
        world_size=ctx.world_size,
        workers=default_workers() if cfg.workers is None else cfg.workers,
        image_size=cfg.image_size,
    )
    train_loader, test_loader = data.make_loaders(settings)
    augment = build_augment(
        cfg.auto_augment, cfg.rand_augment_ops, cfg.rand_augment_magnitude, cfg.random_erasing
    )
    attach_augment(train_loader, augment, cfg.dataset)
    return train_loader, test_loader


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Loader, ctx: DistContext = SINGLE, precision: str = "fp32"
) -> dict[str, float]:
    """Top-1 / top-5 error (%) and mean loss over the loader (summed over processes), with the
    forward pass in ``precision`` (a resolved one: fp32, bf16 or fp16), on the model's device.
    The sums stay on the device until the end: one host synchronisation per evaluation."""
    model.eval()
    device = next(model.parameters()).device
    total = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in loader:
        if not len(y):  # this process's share of a short last batch
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        top1 += hit[:, 0].sum()
        top5 += hit.any(dim=1).sum()
        total += y.numel()
    loss_sum, top1, top5 = loss_sum.item(), top1.item(), top5.item()
    if ctx.active:
        total, loss_sum, top1, top5 = sum_values(ctx, [total, loss_sum, top1, top5])
    return {
        "test_loss": loss_sum / total,
        "test_top1_err": 100.0 * (1 - top1 / total),
        "test_top5_err": 100.0 * (1 - top5 / total),
    }


class Trainer:
    """One training run in one run directory (this process's part of it, if distributed)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        data: Dataset | None = None,
        ctx: DistContext = SINGLE,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.ctx = ctx
        if ctx.active and cfg.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} is the global batch and must divide evenly "
                f"among {ctx.world_size} processes"
            )
        torch.set_num_threads(cfg.threads or default_threads(ctx))
        # With several processes on GPUs, distributed.from_env chose this process's GPU.
        self.device = torch.device(ctx.device) if ctx.active else resolve_device(cfg.device)
        self.device_line = configure_device(self.device, cfg.deterministic)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)  # seeds every CUDA device too
        self.data = data if data is not None else load_data(cfg)
        # Built on the CPU from the seed (the same weights on every device), then moved.
        self.model = build_model(cfg, self.data.num_classes).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if ctx.active and cfg.sync_bn:
            self.model = convert_sync_batchnorm(self.model, on_gpu=self.device.type == "cuda")
        self.params = count_parameters(self.model)
        self.train_loader, self.test_loader = make_loaders(cfg, self.data, ctx)
        for loader in (self.train_loader, self.test_loader):
            loader.to(self.device)
        if len(self.train_loader) == 0 or self.train_loader.num_samples < ctx.world_size:
            raise RunError(
                f"{self.train_loader.num_samples} training images are too few for "
                f"{ctx.world_size} process(es)"
            )
        self.optimizer = build_optimizer(
            self.model,
            cfg.optimizer,
            cfg.lr,
            cfg.momentum,
            cfg.nesterov,
            cfg.weight_decay,
            cfg.betas,
        )
        # Modern options (docs/training.md): all None / {} with the papers' recipes.
        self.mixing = build_mixing(
            self.data.num_classes,
            cfg.mixup_alpha,
            cfg.cutmix_alpha,
            cfg.mix_prob,
            cfg.mix_switch_prob,
        )
        self.loss_kwargs = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}
        self.ema = build_ema(self.model, cfg.ema_decay)
        self.eager_model = wrap(self.model, ctx, cfg.sync_bn)  # DDP around it, or itself
        self.compiled, self.compile_reason = self._resolve_compile()
        self.precision, self.precision_reason = decide_precision(cfg.precision, self.device)
        self.scaler = grad_scaler(self.precision, self.device)  # fp16 only
        # The devices this run has trained on (a resume may change it): what, and from which
        # step. The checkpoint carries the list; summary.json reports it.
        self.devices: list[dict[str, Any]] = []
        # On a GPU the loop checks the loss and the stop requests every SYNC_EVERY steps, so
        # that the GPU never waits on Python (see train_epoch); on the CPU, every step.
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY
        # state_dict() and evaluate() keep using the uncompiled self.model.
        self.train_model = compiled(self.eager_model) if self.compiled else self.eager_model
        self.epoch = 0  # epochs finished
        self.step = 0
        self.progress: EpochProgress | None = None  # set when resuming inside an epoch
        self.metrics: list[dict[str, Any]] = []
        self.wall_time = 0.0
        self.saved: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint
        self.loggers = RunLoggers(cfg, self.out, self.data, ctx)  # --log; none off rank 0

    def _resolve_compile(self) -> tuple[bool, str]:
        """``compile`` as true/false (fastpath.py has the rule for auto; every rank computes the
        same answer). The checkpoint records it, and a resume keeps it."""
        cfg = self.cfg
        steps = cfg.epochs * len(self.train_loader)
        if self.device.type == "cuda" and cfg.compile == "auto":
            return False, "auto: off on CUDA until measured on a GPU (--compile on to try)"
        step_seconds = 0.0
        if cfg.compile == "auto" and steps >= MIN_COMPILED_STEPS:  # else no estimate needed
            macs = macs_per_image(
                self.model, getattr(self.model, "in_chans", 3), self.data.image_size
            )
            step_seconds = estimated_step_seconds(macs, cfg.batch_size, torch.get_num_threads())
        return decide_compile(cfg.compile, steps, step_seconds, compile_saving(cfg.attention))

    # ------------------------------------------------------------ state
    def state_dict(self, progress: EpochProgress | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``progress`` for a checkpoint inside an epoch."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "wall_time": self.wall_time,
            "rng": rng_state(self.device),
            "loader": self.train_loader.state_dict(),
            "progress": None if progress is None else progress.state(),
            "compiled": self.compiled,
            "precision": self.precision,
            "devices": self.devices,
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
            if self.epoch < 0 or self.step < 0:
                raise ValueError(f"epoch {self.epoch}, step {self.step}")
            self.wall_time = float(state.get("wall_time", 0.0))
            self.devices = [dict(d) for d in state.get("devices", [])]
            set_rng_state(state["rng"], self.device)
            if "loader" in state:
                self.train_loader.load_state_dict(state["loader"])
            else:  # written before mid-epoch checkpoints existed: always at an epoch's end
                self.train_loader.generator.set_state(state["rng"]["loader"])
            progress = state.get("progress")
            steps = len(self.train_loader)
            self.progress = (
                None
                if progress is None
                else EpochProgress.from_state(progress, steps).to(self.device)
            )
            position = self.train_loader.state_dict()["position"]
            if position != (self.progress.steps_done if self.progress else 0):
                raise ValueError(f"loader position {position} disagrees with the epoch progress")
            # An exact resume runs the same kind of step as before (checkpoints from before
            # the compile setting: eager).
            compiled_before = bool(state.get("compiled", False))
            if compiled_before != self.compiled:
                self.compiled, self.compile_reason = compiled_before, "as the run started"
                self.train_model = (
                    compiled(self.eager_model) if compiled_before else self.eager_model
                )
            # Likewise the precision ``auto`` chose (checkpoints from before it: fp32).
            precision_before = str(state.get("precision", "fp32"))
            if precision_before != self.precision:
                if precision_before == "fp16" and self.device.type != "cuda":
                    raise RunError(
                        f"this run trains in fp16 with a gradient scaler, which needs a CUDA "
                        f"device; resume it with --device cuda, not on {self.device}"
                    )
                decide_precision(precision_before, self.device)  # a known one
                self.precision, self.precision_reason = precision_before, "as the run started"
                self.scaler = grad_scaler(self.precision, self.device)
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise RunError(f"checkpoint does not match this run: {one_line(e)}") from e
        self.saved = (self.epoch, self.step)

    # ------------------------------------------------------------ files (rank 0 writes)
    def write_file(self, name: str, write: Callable[[], None]) -> None:
        """Run a file write; an OSError (full disk, read-only mount) becomes one RunError line."""
        try:
            write()
        except OSError as e:
            if self.saved is None:
                kept = "no checkpoint was saved yet"
            else:
                kept = (
                    f"the previous checkpoint (epoch {self.saved[0]}, step {self.saved[1]}) "
                    f"is kept; continue with --resume {self.out} once this is fixed"
                )
            raise RunError(f"cannot write {self.out / name}: {describe_os_error(e)}; {kept}") from e

    def save(self) -> None:
        """End of an epoch: weights, metrics, then the checkpoint."""

        def write() -> None:
            # checkpoint.pt goes last: it is what resume trusts, so the files written before
            # it are never behind it (a crash in between only repeats that epoch's writes).
            meta = weights_metadata(epoch=self.epoch, precision=self.precision)
            path = self.out / "model.safetensors"
            self.write_file(path.name, lambda: save_weights(path, self.model, meta))
            if self.ema is not None:
                ema_path = self.out / "model_ema.safetensors"
                self.write_file(
                    ema_path.name, lambda: save_weights(ema_path, self.ema.module, meta)
                )
            self.write_file("metrics.jsonl", lambda: write_metrics(self.out, self.metrics))
            self._write_checkpoint(None)

        on_main(self.ctx, write)
        self.saved = (self.epoch, self.step)

    def save_mid_epoch(self, progress: EpochProgress) -> None:
        """Inside an epoch: the checkpoint only (the weights file stays the last epoch's)."""
        progress.gather_on_main(self.ctx)
        on_main(self.ctx, lambda: self._write_checkpoint(progress))
        self.saved = (self.epoch, self.step)

    def _write_checkpoint(self, progress: EpochProgress | None) -> None:
        path = self.out / "checkpoint.pt"
        state = self.state_dict(progress)
        self.write_file(path.name, lambda: save_checkpoint(path, state))

    def write_json(self, name: str, value: Any) -> None:
        on_main(
            self.ctx,
            lambda: self.write_file(name, lambda: atomic_write_json(self.out / name, value)),
        )

    def interrupted(self, signum: int, mid_epoch: bool) -> Interrupted:
        where = f"step {self.step} (epoch {self.epoch + 1})" if mid_epoch else f"epoch {self.epoch}"
        return Interrupted(
            signum,
            f"stopped by {signal_name(signum)} after {where}, checkpoint saved in {self.out}; "
            f"continue with: attnzoo train --resume {self.out}",
        )

    # ------------------------------------------------------------ loop
    def _loss_weight(self, batch_index: int, local: int) -> float:
        """DDP averages gradients over processes; weigh each process's mean loss by its share
        of the global batch so that the average is the global batch's mean (1.0 when even)."""
        n, b = self.train_loader.num_samples, self.cfg.batch_size
        global_batch = min(b, n - batch_index * b)
        return local * self.ctx.world_size / global_batch

    def train_epoch(self, stop: GracefulStop | None = None) -> dict[str, float]:
        """Train the rest of the current epoch; on a signal, save and raise ``Interrupted``."""
        cfg, ctx, model, loader = self.cfg, self.ctx, self.train_model, self.train_loader
        model.train()
        steps = len(loader)
        device = self.device
        progress, self.progress = self.progress or EpochProgress().to(device), None
        # Non-finite losses since the last check, on the device (a GPU never waits for it).
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        checked_step = self.step
        start = time.perf_counter() - progress.train_time
        # progress None: tqdm decides (a bar only on a terminal); other ranks never show one.
        disable = True if not ctx.is_main else None if cfg.progress is None else not cfg.progress
        bar = tqdm(
            total=steps,
            initial=progress.steps_done,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=disable,
        )
        it = iter(loader)
        lr = learning_rate(cfg, self.epoch + progress.steps_done / steps)
        for i in range(progress.steps_done, steps):
            t0 = time.perf_counter()
            x, y = next(it)
            # No-ops for the in-memory loader, whose batches are made on the device.
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y  # class indices; mixed batches: class probabilities (mixing.py)
            if self.mixing is not None:
                x, target = self.mixing(x, y)
            progress.loader_time += time.perf_counter() - t0
            lr = learning_rate(cfg, self.epoch + i / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with autocast(self.precision, device):
                output = model(x)
                loss = training_loss(output, target, **self.loss_kwargs)
            logits = main_logits(output)
            # The checks (a non-finite loss, a stop request on any process) synchronise with
            # the device: every step on the CPU, every sync_every steps on a GPU, and always
            # before a checkpoint, so a checkpoint never follows a non-finite loss.
            every = cfg.checkpoint_every_steps
            check = (
                (self.step + 1) % self.sync_every == 0
                or i == steps - 1
                or bool(every and (self.step + 1) % every == 0)
            )
            nonfinite |= ~torch.isfinite(loss.detach())
            stop_signal = requested(stop) if not ctx.active else 0
            if check:
                bad = bool(nonfinite)
                any_bad, stop_signal = max_of(ctx, bad, requested(stop))
                if any_bad:
                    if not bad:
                        what = "another process's loss is not finite"
                    elif self.sync_every == 1:
                        what = f"loss is {loss.item()}"
                    else:
                        what = f"the loss became non-finite after step {checked_step}"
                    raise RunError(
                        f"{what} at epoch {self.epoch + 1}, step {self.step + 1}; "
                        f"stopping (the last good checkpoint in {self.out} is kept)"
                    )
                checked_step = self.step + 1
            self.optimizer.zero_grad(set_to_none=True)
            if ctx.active:
                loss_to_back = loss * self._loss_weight(i, y.numel())
            else:
                loss_to_back = loss
            if self.scaler is not None:  # fp16: scaled gradients, skipped steps on overflow
                self.scaler.scale(loss_to_back).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss_to_back.backward()
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            progress.loss_sum += loss.detach() * y.numel()
            progress.correct += (logits.detach().argmax(1) == y).sum()
            progress.seen += y.numel()
            progress.steps_done = i + 1
            elapsed = time.perf_counter() - start
            bar.update()
            if not bar.disable and (i % 10 == 0 or i == steps - 1):  # .item() synchronises
                bar.set_postfix(
                    loss=f"{progress.loss_sum.item() / progress.seen:.3f}",
                    acc=f"{100 * progress.correct.item() / progress.seen:.1f}",
                    img_s=f"{progress.seen * ctx.world_size / elapsed:.0f}",
                )
            # The epoch's last step goes on to the evaluation and the epoch save instead.
            if i < steps - 1:
                if stop_signal or (every and self.step % every == 0):
                    progress.train_time = time.perf_counter() - start
                    self.save_mid_epoch(progress)
                if stop_signal:
                    bar.close()
                    raise self.interrupted(stop_signal, mid_epoch=True)
        bar.close()
        train_time = time.perf_counter() - start
        if ctx.active:
            loss_sum, correct, seen = sum_values(
                ctx, [progress.loss_sum.double().item(), progress.correct.item(), progress.seen]
            )
        else:
            loss_sum, correct, seen = (
                progress.loss_sum.item(),
                progress.correct.item(),
                progress.seen,
            )
        return {
            "train_loss": loss_sum / seen,
            "train_acc": 100.0 * correct / seen,
            "lr": lr,
            "train_time": train_time,
            "loader_time": progress.loader_time,
            "images_per_s": seen / train_time,
        }

    def note_device(self) -> None:
        """Record where this part of the run trains (a resume may move the run)."""
        info = {**device_info(self.device), "from_step": self.step}
        if not self.devices or {k: v for k, v in self.devices[-1].items() if k != "from_step"} != {
            k: v for k, v in info.items() if k != "from_step"
        }:
            self.devices.append(info)

    def fit(
        self, log: Callable[[str], None] = print, stop: GracefulStop | None = None
    ) -> dict[str, Any]:
        """Train the remaining epochs, saving after each; rank 0 alone logs and writes."""
        cfg, ctx = self.cfg, self.ctx
        log = log if ctx.is_main else quiet
        self.note_device()
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter() - (self.progress.train_time if self.progress else 0.0)
            row = {"epoch": self.epoch + 1, **self.train_epoch(stop)}
            row.update(evaluate(self.model, self.test_loader, ctx, self.precision))
            if self.ema is not None:
                ema_row = evaluate(self.ema.module, self.test_loader, ctx, self.precision)
                row.update({f"{k}_ema": v for k, v in ema_row.items()})
            row["epoch_time"] = time.perf_counter() - t0
            self.wall_time += row["epoch_time"]
            self.epoch += 1
            self.metrics.append(row)
            self.loggers.epoch_end(row, self.model, log)  # before the save: see loggers.py
            self.save()
            log(
                f"epoch {row['epoch']}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"train acc {row['train_acc']:.2f}%  test err {row['test_top1_err']:.2f}% "
                f"(top-5 {row['test_top5_err']:.2f}%)  lr {row['lr']:.4g}  "
                f"{row['epoch_time']:.1f}s  {row['images_per_s']:.0f} img/s"
                + (
                    f"  EMA test err {row['test_top1_err_ema']:.2f}%"
                    if self.ema is not None
                    else ""
                )
            )
            (stop_signal,) = max_of(ctx, requested(stop))
            if stop_signal and self.epoch < cfg.epochs:
                raise self.interrupted(stop_signal, mid_epoch=False)
        summary = self.summary()
        self.write_json("summary.json", summary)
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
            **(
                {
                    "final_top1_err_ema": last["test_top1_err_ema"],
                    "best_top1_err_ema": min(r["test_top1_err_ema"] for r in self.metrics),
                }
                if self.ema is not None
                else {}
            ),
            "precision": self.precision,
            "compiled": self.compiled,
            "gates": kernels.describe(self.device),
            "machine": machine_info(),
            "devices": self.devices,
            "wall_time": self.wall_time,
            "loader_share": sum(r["loader_time"] for r in self.metrics)
            / max(sum(r["train_time"] for r in self.metrics), 1e-9),
        }


def train(
    cfg: TrainConfig,
    out: str | os.PathLike,
    log: Callable[[str], None] = print,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` (which must not hold another run)."""
    out = Path(out)
    cfg.validate()
    require_loggers(cfg.log)  # a missing package fails here, before any training
    ctx = ctx or from_env(cfg.device)
    log = log if ctx.is_main else quiet
    with claimed_run_dir(out, ctx, fresh=True):
        trainer = Trainer(cfg, out, ctx=ctx)
        path = out / "config.yaml"
        on_main(
            ctx,
            lambda: trainer.write_file(path.name, lambda: atomic_write_yaml(path, cfg.to_dict())),
        )
        log(
            f"{cfg.model} + {cfg.attention or 'no attention'} on {cfg.dataset}: "
            f"{trainer.params:,} parameters, {trainer.train_loader.num_samples} training images, "
            f"{plural(cfg.epochs, 'epoch')}"
            + (f", {plural(ctx.world_size, 'process', 'processes')}" if ctx.active else "")
            + f" -> {out}"
        )
        log(f"device {trainer.device_line}")
        log(f"precision {trainer.precision} ({trainer.precision_reason})")
        if cfg.attention:
            log(f"attention gates: {kernels.describe(trainer.device)}")
        if trainer.compiled:
            log(f"torch.compile ({trainer.compile_reason}); the first steps compile")
        with GracefulStop() as stop, trainer.loggers:
            return trainer.fit(log, stop)


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    try:
        return TrainConfig.from_dict(read_config(Path(run_dir))).validate()
    except ValueError as e:
        raise RunError(f"{run_dir}/config.yaml: {e}") from e


def resume(
    run_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    ctx: DistContext | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint (with any number of processes).

    ``threads`` replaces the run's torch threads (a speed setting: the results are the same),
    for a resume that shares the machine differently than the start did. ``device`` (auto,
    cpu, cuda, cuda:N) moves the run: a GPU run continues on the CPU, or the other way (the
    precision and compile choices stay the run's; the numbers then differ by rounding only)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if threads is not None:
        cfg.threads = threads
    if device is not None:
        cfg.device = device
    cfg.validate()
    require_loggers(cfg.log)
    ctx = ctx or from_env(cfg.device)
    log = log if ctx.is_main else quiet
    with claimed_run_dir(run_dir, ctx, fresh=False):
        state = load_checkpoint(run_dir / "checkpoint.pt")
        trainer = Trainer(cfg, run_dir, ctx=ctx)
        trainer.load_state_dict(state)
        metrics = read_metrics(run_dir)
        if len(metrics) < trainer.epoch:
            raise RunError(
                f"{run_dir / 'metrics.jsonl'} has {len(metrics)} rows but the checkpoint is after "
                f"epoch {trainer.epoch}"
            )
        trainer.metrics = metrics[: trainer.epoch]
        where = f"after epoch {trainer.epoch}/{cfg.epochs}"
        if trainer.progress:
            where += f", step {trainer.step} ({trainer.progress.steps_done} steps into epoch {trainer.epoch + 1})"
        log(f"resuming {run_dir} {where} on {trainer.device_line}")
        if trainer.epoch >= cfg.epochs:
            trainer.save()  # the crash may have come between the final writes
            summary = trainer.summary()
            trainer.write_json("summary.json", summary)
            return summary
        with GracefulStop() as stop, trainer.loggers:
            return trainer.fit(log, stop)


def evaluate_run(
    run_dir: str | os.PathLike,
    data_dir: str | None = None,
    ema: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Re-evaluate the saved weights of a run on its test set (``ema``: the weight EMA's,
    model_ema.safetensors, which runs with ``ema_decay`` write), on ``device`` whatever the
    run trained on."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = run_dir / ("model_ema.safetensors" if ema else "model.safetensors")
    if ema and not weights.exists():
        raise RunError(
            f"{run_dir} has no {weights.name}: the run was trained without a weight EMA "
            f"(ema_decay {cfg.ema_decay}); evaluate it without --ema"
        )
    if data_dir:
        cfg.data_dir = data_dir
    where = resolve_device(device)
    configure_device(where)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    data = load_data(cfg)
    model = build_model(cfg, data.num_classes)
    metadata = read_weights_metadata(load_weights(weights, model))
    model = model.to(where)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, test = make_loaders(cfg, data)
    test.to(where)
    # The precision the run evaluated in (weights from before the setting: fp32). fp16 needs
    # a GPU; on the CPU such weights are evaluated in fp32.
    precision = metadata.get("precision", "fp32")
    if precision == "fp16" and where.type != "cuda":
        precision = "fp32"
    result = evaluate(model, test, precision=decide_precision(precision, where)[0])
    result.update(
        params=count_parameters(model),
        images=test.num_samples,
        precision=precision,
        device=str(where),
    )
    return result


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True)
