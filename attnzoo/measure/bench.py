"""Training-step time of a backbone with each attention, side by side, in one process.

``attnzoo bench --model resnet56 --attentions none se eca cbam ham --modes eager channels_last``

Every (attention, mode) case is built once, warmed up, then timed round-robin: one step of
each case in turn, ``repeats`` times, so that machine noise (other processes, thermal
changes) hits every case alike. Reported: median step time, images/s, the ratio to the
plain network in the same mode, and the ratio to the first mode for the same attention.

Modes:

- ``eager``: contiguous (NCHW) tensors, fp32.
- ``channels_last``: NHWC memory format, fp32.
- ``bf16``: channels_last under ``torch.autocast(dtype=bfloat16)``.
- ``compiled``: channels_last, fp32, the model wrapped in ``torch.compile``; the compile
  time (first steps) is reported separately and not in the median.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from ..registry import NO_ATTENTION, create_model
from ..train.loss import training_loss

MODES = ("eager", "channels_last", "bf16", "compiled")


def check_modes(modes: list[str]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")


def make_step(
    model_name: str,
    attention: str | None,
    mode: str,
    batch: int,
    size: int,
    classes: int,
    model_kwargs: dict | None = None,
):
    """A closure running one SGD training step, and the model's parameter count."""
    torch.manual_seed(0)
    attention = None if attention in NO_ATTENTION else attention
    model = create_model(
        model_name, num_classes=classes, attention=attention, **(model_kwargs or {})
    )
    params = sum(p.numel() for p in model.parameters())
    fmt = torch.contiguous_format if mode == "eager" else torch.channels_last
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if mode == "compiled" else model
    x = torch.randn(batch, getattr(model, "in_chans", 3), size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))

    def context():
        return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else nullcontext()

    def step() -> None:
        with context():
            loss = training_loss(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, params


def bench(
    model: str,
    attentions: list[str],
    modes: list[str],
    batch_size: int = 128,
    input_size: int = 32,
    num_classes: int = 10,
    repeats: int = 10,
    warmup: int = 2,
    model_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Time every (attention, mode) case; see the module docstring."""
    check_modes(modes)
    if min(batch_size, input_size, num_classes, repeats) < 1 or warmup < 0:
        raise ValueError("batch_size, input_size, num_classes and repeats must be positive")
    cases = [(a, m) for a in attentions for m in modes]
    steps, params, setup = {}, {}, {}
    for case in cases:
        steps[case], params[case[0]] = make_step(
            model, case[0], case[1], batch_size, input_size, num_classes, model_kwargs
        )
    for case, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1 if case[1] == "compiled" else 0)):
            step()
        setup[case] = time.perf_counter() - t0
    times: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    for _ in range(repeats):
        for case, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[case].append(time.perf_counter() - t0)
    rows = []
    for a, m in cases:
        t = statistics.median(times[(a, m)])
        base = statistics.median(times[("none", m)]) if ("none", m) in times else None
        first = statistics.median(times[(a, modes[0])])
        rows.append(
            {
                "attention": a,
                "mode": m,
                "params": params[a],
                "step_ms": 1000 * t,
                "images_per_s": batch_size / t,
                "vs_plain": t / base if base else None,
                "vs_first_mode": t / first,
                "warmup_s": setup[(a, m)],
            }
        )
    return {
        "settings": {
            "model": model,
            "batch_size": batch_size,
            "input_size": input_size,
            "num_classes": num_classes,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }


def format_bench(result: dict[str, Any]) -> str:
    st = result["settings"]
    plain = {r["mode"]: r["params"] for r in result["rows"] if r["attention"] == "none"}
    lines = [
        f"{st['model']}, training step, batch {st['batch_size']}, "
        f"{st['input_size']}x{st['input_size']}, {st['threads']} threads, torch {st['torch']}, "
        f"median of {st['repeats']} (round-robin)",
        "| attention | mode | params | delta | step ms | images/s | vs no attention "
        "| vs first mode | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        base = plain.get(r["mode"])
        delta = f"{r['params'] - base:+,}" if base is not None else "-"
        vs_plain = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
        lines.append(
            f"| {r['attention']} | {r['mode']} | {r['params']:,} | {delta} | {r['step_ms']:.1f} "
            f"| {r['images_per_s']:.0f} | {vs_plain} | {r['vs_first_mode']:.2f}x "
            f"| {r['warmup_s']:.1f} |"
        )
    return "\n".join(lines)
