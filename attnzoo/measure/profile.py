"""What a model costs: parameters, MACs/FLOPs, memory and latency, beside the plain network.

Counting conventions (printed with every table):

- **MACs**: multiply-accumulates of the convolutions, linear layers, matmuls and attention
  products, counted by ``torch.utils.flop_counter``. This is the quantity the papers'
  "FLOPs" columns report (ResNet-50: 4.1 G at 224x224).
- **FLOPs** = 2 x MACs, what ``torch.utils.flop_counter`` itself reports. Neither count
  includes elementwise work (BN, activations, pooling, gates, multiplies), which is where
  most of an attention module's wall-clock time goes: see the latency columns.
- **Train FLOPs**: forward + backward of one training step (backward is about 2x forward).
- **Param MiB**: parameters x 4 bytes / 2**20, the "Memory(M)" column of the HAM tables.
- **Peak train MiB**: the peak memory of the first training step of a fresh model (forward,
  backward, SGD with momentum) above what was held just before it, so it includes
  activations, gradients and optimizer state. On the CPU: resident memory (``ru_maxrss``)
  of a fresh process. On CUDA: ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats``, above ``torch.cuda.memory_allocated`` before the
  step, i.e. the tensors of the caching allocator (cuDNN and cuBLAS workspaces included, the
  CUDA context and the allocator's cached free blocks not). One step of another copy of the
  model runs first, so that cuDNN's algorithm search (``cudnn.benchmark``) is not counted.
  The table's last line says which of the two a figure is.
- **Latency**: median time of a training step and of an inference forward pass, with and
  without attention interleaved round-robin in the same process, after ``warmup`` untimed
  calls of each. On the CPU wall-clock (``time.perf_counter``); on CUDA the GPU's time
  between two ``torch.cuda.Event``s recorded around each call, read after
  ``torch.cuda.synchronize`` (``bench.StepTimer``), with model and inputs on the GPU and
  ``cudnn.benchmark`` on.

Devices: ``device`` (CLI ``--device auto|cpu|cuda|cuda:N``; the library defaults to the
CPU, the CLI to ``auto``). Parameters, MACs and FLOPs are counted on the CPU on every device
(the count does not depend on it). On CUDA ``threads`` does not apply, and a step that runs
out of GPU memory raises ``bench.DeviceOutOfMemory`` (one line: model, attention, batch size,
use a smaller ``--batch-size``) after emptying the CUDA cache.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .. import kernels
from ..registry import create_model
from ..train.loss import main_logits, training_loss
from ..utils.machine import machine_info
from .bench import (
    DeviceOutOfMemory,
    StepTimer,
    as_device,
    device_settings,
    free_device_memory,
    is_device_oom,
    machine_lines,
    measuring_on,
    oom_detail,
    sync,
    where,
)

MEMORY_SOURCES = {
    "cpu": "peak resident memory (ru_maxrss) of a fresh process above its usage before the step",
    "cuda": "torch.cuda.max_memory_allocated above torch.cuda.memory_allocated before the step "
    "(tensors of the caching allocator)",
}


@dataclass(frozen=True)
class ModelSpec:
    model: str
    attention: str | None = None
    attention_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    num_classes: int = 10

    def build(self) -> torch.nn.Module:
        return create_model(
            self.model,
            num_classes=self.num_classes,
            attention=self.attention,
            attention_kwargs=dict(self.attention_kwargs),
            **dict(self.model_kwargs),
        )

    def plain(self) -> ModelSpec:
        return ModelSpec(self.model, None, {}, self.model_kwargs, self.num_classes)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_mib(params: int) -> float:
    return params * 4 / 2**20


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # flop_counter hands formulas the shapes of tensor arguments.
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch.utils.flop_counter knows the CUDA attention kernels but not the CPU one, which it
# would count as zero (the O((HW)^2) work of CSM and DANet's position attention).
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


class _TotalOnly:
    """Stands in for FlopCounterMode's per-module tracker: we read the total only, and the
    tracker's backward hooks fail inside a custom autograd node whose backward calls
    ``torch.autograd.grad`` (the fused gates, ``attention/layers.py: pooled_gate``)."""

    parents = {"Global"}

    def __enter__(self) -> _TotalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def count_flops(model: torch.nn.Module, x: torch.Tensor, train: bool = False) -> int:
    """FLOPs (2 x MACs) of a forward pass, or of forward + backward when ``train``."""
    model.train(train)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    counter.mod_tracker = _TotalOnly()
    # The gate kernels (attnzoo.kernels) are not aten ops the counter sees: count the
    # PyTorch path's operations, which are the paper's.
    with counter, kernels.kernels("off"):
        if train:
            out = model(x)
            y = torch.zeros(x.shape[0], dtype=torch.long)
            training_loss(out, y).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _inputs(
    batch: int, size: int, model: torch.nn.Module, classes: int, device: torch.device | str = "cpu"
):
    chans = getattr(model, "in_chans", 3)
    x = torch.randn(batch, chans, size, size).to(device)
    y = torch.randint(0, classes, (batch,)).to(device)
    return x.contiguous(memory_format=torch.channels_last), y


def _train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = training_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(spec: ModelSpec, batch: int, size: int, threads: int | None, queue) -> None:
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = spec.build().to(memory_format=torch.channels_last).train()
        x, y = _inputs(batch, size, model, spec.num_classes)
        step = _train_step(model, x, y)
        before = _rss_mib()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        queue.put(("ok", max(peak - before, 0.0)))
    except BaseException as e:  # report to the parent instead of dying silently
        queue.put(("error", f"{type(e).__name__}: {e}"))


def peak_train_memory_mib(
    spec: ModelSpec, batch: int, size: int, threads: int | None = None
) -> float:
    """Peak resident memory of one training step above the memory held before it."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(spec, batch, size, threads, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory measurement of {spec.model} failed: {value}")
    return float(value)


def cuda_peak_train_memory_mib(
    spec: ModelSpec, batch: int, size: int, device: torch.device
) -> float:
    """Peak CUDA memory of the first training step of a fresh model above what was
    allocated before it (``torch.cuda.max_memory_allocated``), in MiB."""

    def fresh_step():
        torch.manual_seed(0)
        model = spec.build().to(device, memory_format=torch.channels_last).train()
        x, y = _inputs(batch, size, model, spec.num_classes, device)
        return _train_step(model, x, y)

    # A throwaway step first: cuDNN's algorithm search tries workspaces that training does
    # not keep, and the search result is cached for the measured model's identical shapes.
    fresh_step()()
    free_device_memory()
    step = fresh_step()
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0) / 2**20


def _on_device(
    measure: Callable[[], Any],
    which: Callable[[], ModelSpec],
    batch: int,
    size: int,
    device: torch.device,
) -> Any:
    """``measure()``, with a GPU out-of-memory error turned into ``DeviceOutOfMemory`` for
    the spec ``which()`` names, after the CUDA cache is emptied."""
    try:
        return measure()
    except RuntimeError as e:
        if not is_device_oom(e):
            raise
        s = which()
        oom = DeviceOutOfMemory(s.model, s.attention, batch, size, device, oom_detail(e))
    # Here the failed call's frames (and the tensors they held) are gone with the exception.
    free_device_memory()
    raise oom


def time_models(
    specs: list[ModelSpec],
    batch: int,
    size: int,
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> list[dict[str, float]]:
    """Median train-step and inference latency (ms) per spec, measured round-robin on
    ``device`` (``bench.StepTimer``: wall-clock on the CPU, CUDA events on a GPU)."""
    device = torch.device(device)
    current = [specs[0]]
    return _on_device(
        lambda: _time_models(specs, batch, size, repeats, warmup, device, current),
        lambda: current[0],
        batch,
        size,
        device,
    )


def _time_models(specs, batch, size, repeats, warmup, device, current) -> list[dict[str, float]]:
    if device.type == "cuda":
        warmup = max(warmup, 1)  # the first step holds cuDNN's algorithm search
    runs = []
    for spec in specs:
        current[0] = spec
        torch.manual_seed(0)
        model = spec.build().to(device, memory_format=torch.channels_last)
        x, y = _inputs(batch, size, model, spec.num_classes, device)
        train = _train_step(model, x, y)

        def infer(model=model, x=x) -> None:
            model.eval()
            with torch.no_grad():
                main_logits(model(x))
            model.train()

        runs.append((train, infer))
    for spec, (train, infer) in zip(specs, runs, strict=True):
        current[0] = spec
        for _ in range(warmup):
            train()
            infer()
    timer = StepTimer(device)
    for _ in range(repeats):
        for i, (train, infer) in enumerate(runs):
            current[0] = specs[i]
            for key, fn in (("train", train), ("infer", infer)):
                timer((i, key), fn)
    times = timer.read()
    return [
        {
            "train_ms": 1000 * statistics.median(times[(i, "train")]),
            "infer_ms": 1000 * statistics.median(times[(i, "infer")]),
        }
        for i in range(len(runs))
    ]


def profile(
    spec: ModelSpec,
    input_size: int = 32,
    batch_size: int = 128,
    repeats: int = 10,
    timing: bool = True,
    memory: bool = True,
    baseline: bool = True,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 2,
) -> dict[str, Any]:
    """Profile ``spec`` (and, with ``baseline``, the same model without attention); memory
    and latency on ``device``, the counts on the CPU (see the module docstring).

    Returns ``{"settings": ..., "rows": [row, ...], "ratios": {...}}``; each row has params,
    param_mib, macs, flops (forward, batch 1), train_flops (per image), and when asked
    peak_train_mib, train_ms and infer_ms at ``batch_size``. Raises ``DeviceOutOfMemory``
    when a CUDA step does not fit.
    """
    if input_size < 1 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError("input_size, batch_size and repeats must be positive")
    device = as_device(device)
    specs = [spec.plain(), spec] if baseline and spec.attention else [spec]
    rows = []
    for s in specs:
        model = s.build()
        x = torch.randn(1, getattr(model, "in_chans", 3), input_size, input_size)
        params = count_params(model)
        flops = count_flops(model, x)
        # Training FLOPs per image on a batch of 2 (BatchNorm needs two samples).
        train_flops = count_flops(model, torch.cat([x, x]), train=True) // 2
        rows.append(
            {
                "model": s.model,
                "attention": s.attention or "none",
                "params": params,
                "param_mib": param_mib(params),
                "macs": flops // 2,
                "flops": flops,
                "train_flops": train_flops,
            }
        )
    with measuring_on(device):
        if memory:
            for s, row in zip(specs, rows, strict=True):
                if device.type == "cuda":
                    row["peak_train_mib"] = _on_device(
                        lambda s=s: cuda_peak_train_memory_mib(s, batch_size, input_size, device),
                        lambda s=s: s,
                        batch_size,
                        input_size,
                        device,
                    )
                else:
                    row["peak_train_mib"] = peak_train_memory_mib(
                        s, batch_size, input_size, threads
                    )
        if timing:
            times = time_models(specs, batch_size, input_size, repeats, warmup, device)
            for row, t in zip(rows, times, strict=True):
                row.update(t)
    ratios = {}
    if len(rows) == 2:
        base, att = rows
        for key in ("params", "macs", "peak_train_mib", "train_ms", "infer_ms"):
            if key in base and base[key]:
                ratios[key] = att[key] / base[key]
    return {
        "settings": {
            "spec": asdict(spec),
            "input_size": input_size,
            "batch_size": batch_size,
            "repeats": repeats,
            "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": machine_info(),
            **device_settings(device),
            **({"memory_source": MEMORY_SOURCES[device.type]} if memory else {}),
        },
        "rows": rows,
        "ratios": ratios,
    }


def format_profile(result: dict[str, Any]) -> str:
    """A Markdown table of ``profile``'s result, with its conventions."""
    st = result["settings"]
    cols = [
        ("attention", "attention", "{}"),
        ("params", "params", "{:,}"),
        ("param MiB", "param_mib", "{:.2f}"),
        ("MACs (fwd, 1 img)", "macs", "{:,}"),
        ("FLOPs (fwd, 1 img)", "flops", "{:,}"),
        ("train FLOPs / img", "train_flops", "{:,}"),
        ("peak train MiB", "peak_train_mib", "{:.0f}"),
        ("train step ms", "train_ms", "{:.1f}"),
        ("inference ms", "infer_ms", "{:.1f}"),
    ]
    rows = result["rows"]
    cols = [c for c in cols if c[1] in rows[0]]
    lines = [
        f"{rows[0]['model']}, input {st['input_size']}x{st['input_size']}, "
        f"batch {st['batch_size']} for memory and latency (median of {st['repeats']}), "
        f"{where(st)}, torch {st['torch']}",
        machine_lines(st),
        "| " + " | ".join(c[0] for c in cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in cols) + " |")
    if result["ratios"]:
        lines.append("")
        lines.append(
            "with / without attention: "
            + ", ".join(f"{k} {v:.3f}x" for k, v in result["ratios"].items())
        )
    lines.append(
        "MACs: multiply-accumulates of conv/linear/matmul/attention products (the papers' "
        "'FLOPs'); FLOPs = 2 x MACs (torch.utils.flop_counter); elementwise ops not counted."
    )
    if st.get("memory_source"):
        lines.append(f"peak train MiB on {st.get('device', 'cpu')}: {st['memory_source']}.")
    return "\n".join(lines)
