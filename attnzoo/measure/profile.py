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
- **Peak train MiB**: the peak resident memory of one training step (forward, backward, SGD
  with momentum) above what the process held just before it, measured in a fresh process
  (``ru_maxrss``), so it includes activations, gradients and optimizer state.
- **Latency**: median wall-clock time of a training step and of an inference forward pass,
  with and without attention interleaved round-robin in the same process.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..registry import create_model
from ..train.loss import main_logits, training_loss
from ..utils.machine import machine_info, machine_line
from ..utils.text import plural


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
    with counter:
        if train:
            out = model(x)
            y = torch.zeros(x.shape[0], dtype=torch.long)
            training_loss(out, y).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _inputs(batch: int, size: int, model: torch.nn.Module, classes: int):
    chans = getattr(model, "in_chans", 3)
    x = torch.randn(batch, chans, size, size).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,))


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


def time_models(
    specs: list[ModelSpec], batch: int, size: int, repeats: int = 10, warmup: int = 2
) -> list[dict[str, float]]:
    """Median train-step and inference latency (ms) per spec, measured round-robin."""
    runs = []
    for spec in specs:
        torch.manual_seed(0)
        model = spec.build().to(memory_format=torch.channels_last)
        x, y = _inputs(batch, size, model, spec.num_classes)
        train = _train_step(model, x, y)

        def infer(model=model, x=x) -> None:
            model.eval()
            with torch.no_grad():
                main_logits(model(x))
            model.train()

        runs.append((train, infer))
    for train, infer in runs:
        for _ in range(warmup):
            train()
            infer()
    times: list[dict[str, list[float]]] = [{"train": [], "infer": []} for _ in runs]
    for _ in range(repeats):
        for (train, infer), t in zip(runs, times, strict=True):
            for key, fn in (("train", train), ("infer", infer)):
                t0 = time.perf_counter()
                fn()
                t[key].append(time.perf_counter() - t0)
    return [
        {
            "train_ms": 1000 * statistics.median(t["train"]),
            "infer_ms": 1000 * statistics.median(t["infer"]),
        }
        for t in times
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
) -> dict[str, Any]:
    """Profile ``spec`` (and, with ``baseline``, the same model without attention).

    Returns ``{"settings": ..., "rows": [row, ...], "ratios": {...}}``; each row has params,
    param_mib, macs, flops (forward, batch 1), train_flops (per image), and when asked
    peak_train_mib, train_ms and infer_ms at ``batch_size``.
    """
    if input_size < 1 or batch_size < 1 or repeats < 1:
        raise ValueError("input_size, batch_size and repeats must be positive")
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
    if memory:
        for s, row in zip(specs, rows, strict=True):
            row["peak_train_mib"] = peak_train_memory_mib(s, batch_size, input_size, threads)
    if timing:
        for row, t in zip(rows, time_models(specs, batch_size, input_size, repeats), strict=True):
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
        f"{plural(st['threads'], 'thread')}, torch {st['torch']}",
        machine_line(st),
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
    return "\n".join(lines)
