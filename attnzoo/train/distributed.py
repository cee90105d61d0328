"""Data-parallel training: DistributedDataParallel over gloo on CPU processes, over NCCL
with one process per GPU.

Start ``attnzoo train`` under ``torchrun --nproc_per_node=K -m attnzoo train ...`` (or
``attnzoo train --nproc K ...``, which does that for you). Each process then

- reads the whole training split and takes its slice of every global batch: the loader's
  generator is seeded alike everywhere, so all processes draw the same order and the same
  crops/flips (see ``attnzoo/data/loader.py``). ``batch_size`` stays the global batch; each
  process computes ``batch_size / K`` of it;
- wraps the model in ``DistributedDataParallel`` (gradients averaged across processes), with
  ``sync_bn: true`` batch-norm statistics over the global batch (``SyncBatchNorm`` below:
  torch's own only runs on GPUs);
- sums its training and test statistics with the others (``all_reduce``) so the metrics
  are those of the whole run;
- leaves every file to rank 0, which saves the unwrapped model: a checkpoint does not
  depend on the number of processes, so a run can be resumed with any number of them.

On GPUs (``--device cuda`` or ``auto`` with GPUs present, under ``--nproc K`` or torchrun):
the process group uses NCCL, process ``LOCAL_RANK`` trains on ``cuda:LOCAL_RANK``, DDP gets
``device_ids`` and ``sync_bn`` uses torch's native ``nn.SyncBatchNorm``. The collectives
below then move their small tensors through the GPU (NCCL has no CPU tensors).

Decisions that must be the same on every process (stop on a signal, a non-finite loss, a
failed save) are taken together through ``any_of`` so no process is left waiting in a
collective for one that has gone.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import RunError


class PeerFailed(RunError):
    """Another process of the run failed (and reports why itself)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    local_rank: int = 0
    # Where the collectives' tensors live: "cpu" (gloo) or this process's GPU (NCCL).
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0


SINGLE = DistContext()


def from_env(device: str = "cpu") -> DistContext:
    """The context torchrun describes in the environment; joins the process group if needed.

    ``device`` is the run's ``--device`` setting: on CUDA ('cuda', or 'auto' with a GPU) the
    group uses NCCL and this process takes ``cuda:LOCAL_RANK``; else gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if on_gpu:
        if ":" in device:
            raise ValueError(
                f"--device {device} picks one GPU; with several processes each takes "
                f"cuda:LOCAL_RANK, so pass --device cuda"
            )
        if not torch.cuda.is_available() or torch.cuda.device_count() < local:
            raise ValueError(
                f"{local} processes on this machine need {local} GPUs for --device {device}; "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are visible"
            )
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # env:// rendezvous: MASTER_ADDR/PORT, RANK, ...
        dist.init_process_group("nccl" if on_gpu else "gloo")
    where = f"cuda:{local_rank}" if on_gpu else "cpu"
    return DistContext(dist.get_rank(), dist.get_world_size(), local, local_rank, where)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def default_threads(ctx: DistContext) -> int:
    """Torch threads per process when not configured: the cores shared among local processes."""
    return max(1, (os.cpu_count() or 1) // ctx.local_world_size)


# ---------------------------------------------------------------- collectives


def max_of(ctx: DistContext, *values: int) -> tuple[int, ...]:
    """Each value's maximum over processes (one small all_reduce)."""
    if not ctx.active:
        return tuple(int(v) for v in values)
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def any_of(ctx: DistContext, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process."""
    return tuple(bool(v) for v in max_of(ctx, *(int(bool(f)) for f in flags)))


def sum_values(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum over processes, in float64."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def sum_tensor_(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place."""
    if ctx.active:
        dist.all_reduce(tensor)
    return tensor


def on_main(ctx: DistContext, action: Callable[[], Any]) -> None:
    """Run ``action`` on rank 0 only; if it fails, every process raises (together)."""
    error: BaseException | None = None
    if ctx.is_main:
        if not ctx.active:
            action()
            return
        try:
            action()
        except Exception as e:
            error = e
    (failed,) = any_of(ctx, error is not None)
    if error is not None:
        raise error
    if failed:
        raise PeerFailed("process 0 failed (its message says why); stopping")


# ---------------------------------------------------------------- the model


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum is the summed gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the global batch of all processes.

    Same parameters, buffers and state-dict keys as ``BatchNorm1d/2d/3d``, so checkpoints
    load either way. In training it all-reduces per-channel sums (twice: the mean, then
    the squared deviations from it, which is as accurate as one-process BN) through the
    differentiable ``_AllReduceSum``; in eval mode, or without
    a process group, it is plain batch norm. The running variance gets the unbiased global
    variance, as ``nn.BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        # Statistics in float32 whatever the input (bf16 sums of a batch lose most digits,
        # and a bf16 count is exact only up to 256); the output keeps the input's dtype.
        dtype = x.dtype
        x = x.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centered = x - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor):
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased, momentum)


def convert_sync_batchnorm(module: nn.Module, on_gpu: bool = False) -> nn.Module:
    """Replace every batch-norm layer by ``SyncBatchNorm``, sharing its parameters/buffers
    (``on_gpu``: torch's native ``nn.SyncBatchNorm``, which runs on CUDA only)."""
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (SyncBatchNorm, nn.SyncBatchNorm)
    ):
        sync = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def wrap(model: nn.Module, ctx: DistContext, sync_bn: bool) -> nn.Module:
    """The module to train with: ``model`` itself on one process, else DDP around it."""
    if not ctx.active:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # With synced BN every process already holds the same running statistics, so there is
    # no need to copy rank 0's buffers before every forward (newer torch renamed the option).
    options = inspect.signature(DistributedDataParallel).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    on_gpu = ctx.device.startswith("cuda")
    ids = {"device_ids": [ctx.local_rank]} if on_gpu else {}
    return DistributedDataParallel(model, **ids, **{name: not sync_bn})


# ---------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``attnzoo <argv>`` in ``nproc`` processes through torch.distributed.run's launcher.

    Returns the exit status of the run: 0, the first failing process's status (2 for a user
    error, 130/143 after SIGINT/SIGTERM), or 128 + the signal that stopped the launcher.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher logs every failure and signal at length; the processes print their own
    # one line. Its modules set their loggers' levels themselves, so each is quietened.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "attnzoo", *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        codes.insert(0, e.get_first_failure()[1].exitcode)
        # A process killed by signal S reports -S; as a shell would, say 128 + S.
        return next((c if c > 0 else 128 - c for c in codes if c != 0), 1)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
