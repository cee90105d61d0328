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

With ``timm=True`` every attention that timm also implements (se, eca, cbam) is timed a
second time with timm's layer in its place, same weights (``timm_compare.py``; the outputs
are checked equal before timing), and the table gains "ours / timm", our step time over
timm's in the same mode. Attentions timm lacks are timed once, as usual.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

from ..registry import NO_ATTENTION, create_model
from ..train.loss import training_loss
from ..utils.machine import machine_info, machine_line
from ..utils.text import plural
from .timm_compare import TIMM_ATTENTIONS, require_timm, swap_in_timm

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
    impl: str = "ours",
    check: dict | None = None,
):
    """A closure running one SGD training step, and the model's parameter count.

    ``impl="timm"`` replaces our attention modules by timm's with the same weights; the
    equality check's result goes into ``check`` when given."""
    torch.manual_seed(0)
    attention = None if attention in NO_ATTENTION else attention
    model = create_model(
        model_name, num_classes=classes, attention=attention, **(model_kwargs or {})
    )
    if impl == "timm":
        model, report = swap_in_timm(model, attention, input_size=size)
        if check is not None:
            check.update(report)
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
    timm: bool = False,
) -> dict[str, Any]:
    """Time every (attention, mode) case; see the module docstring."""
    check_modes(modes)
    if min(batch_size, input_size, num_classes, repeats) < 1 or warmup < 0:
        raise ValueError("batch_size, input_size, num_classes and repeats must be positive")
    if timm:
        require_timm()
    cases = []
    for a in attentions:
        for m in modes:
            cases.append((a, "ours", m))
            if timm and a in TIMM_ATTENTIONS:
                cases.append((a, "timm", m))
    steps, params, setup = {}, {}, {}
    checks: dict[str, dict] = {}
    for case in cases:
        a, impl, m = case
        steps[case], params[(a, impl)] = make_step(
            model,
            a,
            m,
            batch_size,
            input_size,
            num_classes,
            model_kwargs,
            impl=impl,
            check=checks.setdefault(a, {}) if impl == "timm" else None,
        )
    for case, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1 if case[2] == "compiled" else 0)):
            step()
        setup[case] = time.perf_counter() - t0
    times: dict[tuple[str, str, str], list[float]] = {c: [] for c in cases}
    for _ in range(repeats):
        for case, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[case].append(time.perf_counter() - t0)
    median = {c: statistics.median(t) for c, t in times.items()}
    rows = []
    for a, impl, m in cases:
        t = median[(a, impl, m)]
        base = median.get(("none", "ours", m))
        row = {
            "attention": a,
            "mode": m,
            "params": params[(a, impl)],
            "step_ms": 1000 * t,
            "images_per_s": batch_size / t,
            "vs_plain": t / base if base else None,
            "vs_first_mode": t / median[(a, impl, modes[0])],
            "warmup_s": setup[(a, impl, m)],
        }
        if timm:
            row["impl"] = impl
            # ours / timm, on the timm row (ours is the row just above it).
            row["ours_over_timm"] = median[(a, "ours", m)] / t if impl == "timm" else None
        rows.append(row)
    result = {
        "settings": {
            "model": model,
            "batch_size": batch_size,
            "input_size": input_size,
            "num_classes": num_classes,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": machine_info(),
        },
        "rows": rows,
    }
    if timm:
        import timm as timm_package

        result["settings"]["timm"] = timm_package.__version__
        result["timm_check"] = checks
    return result


def format_bench(result: dict[str, Any]) -> str:
    st = result["settings"]
    rows = result["rows"]
    timm = "timm_check" in result
    plain = {r["mode"]: r["params"] for r in rows if r["attention"] == "none"}
    lines = [
        f"{st['model']}, training step, batch {st['batch_size']}, "
        f"{st['input_size']}x{st['input_size']}, {plural(st['threads'], 'thread')}, "
        f"torch {st['torch']}"
        + (f", timm {st['timm']}" if timm else "")
        + f", median of {st['repeats']} (round-robin)",
        machine_line(st),
        "| attention | mode | params | delta | step ms | images/s | vs no attention "
        "| vs first mode | warm-up s |" + (" ours / timm |" if timm else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if timm else ""),
    ]
    for r in rows:
        base = plain.get(r["mode"])
        delta = f"{r['params'] - base:+,}" if base is not None else "-"
        vs_plain = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
        name = r["attention"] + (" (timm)" if r.get("impl") == "timm" else "")
        line = (
            f"| {name} | {r['mode']} | {r['params']:,} | {delta} | {r['step_ms']:.1f} "
            f"| {r['images_per_s']:.0f} | {vs_plain} | {r['vs_first_mode']:.2f}x "
            f"| {r['warmup_s']:.1f} |"
        )
        if timm:
            ratio = r["ours_over_timm"]
            line += f" {ratio:.2f}x |" if ratio is not None else " - |"
        lines.append(line)
    if result.get("timm_check"):
        checks = "; ".join(
            f"{a}: {c['modules']} modules, outputs {c['output_max_abs_diff']:.1e}, "
            f"gradients {c['grad_max_abs_diff']:.1e}"
            for a, c in result["timm_check"].items()
        )
        lines.append("")
        lines.append(
            "timm layers carry our weights; max |ours - timm| checked before timing "
            f"(random inputs, train and eval mode): {checks}."
        )
    return "\n".join(lines)
