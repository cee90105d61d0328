"""Achieved FLOP/s of a training step, as a fraction of what this machine's matmul reaches.

``attnzoo bench --efficiency --model resnet20 --attentions none se cbam``

- **Train FLOPs per step**: forward + backward FLOPs of one training step at the bench's
  batch size, counted with ``torch.utils.flop_counter`` exactly as ``attnzoo profile``
  counts them (``profile.count_flops``: convolutions, linear layers, matmuls and attention
  products, 2 FLOPs per multiply-accumulate; BN, activations, pooling, gates and the SGD
  update are not counted, so this is the useful dense work of the step).
- **Step time**: ``bench``'s median, the cases timed round-robin.
- **Matmul rate**: 2 n^3 / t of an fp32 ``torch.mm`` of two n x n matrices (n = 2048 by
  default), at the same thread count, timed ``repeats`` times just before and just after
  the steps in the same process; the median of those is the reference ("peak") rate.
- **Efficiency** = (train FLOPs per step / step time) / matmul rate.

On CUDA (``device``, CLI ``--device``): the steps and the matmul run on the GPU and are
timed with ``torch.cuda.Event`` pairs (``bench.StepTimer``; one untimed matmul first); the
FLOPs are still counted on the CPU. The reference is torch's fp32 matmul as configured
(``torch.backends.cuda.matmul.allow_tf32``, off by default), while cuDNN's convolutions may
use TF32 (``torch.backends.cudnn.allow_tf32``, on by default), so on a GPU the fraction can
exceed 100%; both settings are recorded (``settings["tf32"]``) and printed.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from ..registry import NO_ATTENTION, create_model
from .bench import StepTimer, as_device, bench, machine_lines, where
from .profile import count_flops


def time_matmul(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> list[float]:
    """Seconds per fp32 ``torch.mm`` of two n x n matrices on ``device``, ``repeats`` times
    (after one untimed call)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a, b = a.to(device), b.to(device)
    torch.mm(a, b)
    timer = StepTimer(device)
    for _ in range(repeats):
        timer("mm", lambda: torch.mm(a, b))
    return timer.read()["mm"]


def train_step_flops(
    model: str,
    attention: str | None,
    batch_size: int,
    input_size: int,
    num_classes: int = 10,
    model_kwargs: dict | None = None,
) -> int:
    """Counted FLOPs of one training step (forward + backward) at ``batch_size``."""
    torch.manual_seed(0)
    attention = None if attention in NO_ATTENTION else attention
    net = create_model(model, num_classes=num_classes, attention=attention, **(model_kwargs or {}))
    x = torch.randn(2, getattr(net, "in_chans", 3), input_size, input_size)
    # Counted on 2 images (BatchNorm needs two), per image x batch: the count is linear in N.
    return count_flops(net, x, train=True) * batch_size // 2


def efficiency(
    model: str = "resnet20",
    attentions: list[str] | tuple[str, ...] = ("none",),
    mode: str = "channels_last",
    batch_size: int = 128,
    input_size: int = 32,
    num_classes: int = 10,
    repeats: int = 10,
    warmup: int = 2,
    matmul_size: int = 2048,
    model_kwargs: dict | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Achieved FLOP/s of each attention's training step and its fraction of the matmul
    rate on ``device``; see the module docstring. Returns ``{"settings", "matmul", "rows"}``."""
    if matmul_size < 1:
        raise ValueError("matmul_size must be positive")
    device = as_device(device)
    flops = {
        a: train_step_flops(model, a, batch_size, input_size, num_classes, model_kwargs)
        for a in attentions
    }
    before = time_matmul(matmul_size, repeats, device)
    result = bench(
        model,
        list(attentions),
        [mode],
        batch_size=batch_size,
        input_size=input_size,
        num_classes=num_classes,
        repeats=repeats,
        warmup=warmup,
        model_kwargs=model_kwargs,
        device=device,
    )
    after = time_matmul(matmul_size, repeats, device)
    mm_flops = 2 * matmul_size**3
    rate = mm_flops / statistics.median(before + after)
    rows = []
    for r in result["rows"]:
        achieved = flops[r["attention"]] / (r["step_ms"] / 1000)
        rows.append(
            {
                "attention": r["attention"],
                "mode": r["mode"],
                "train_flops_per_step": flops[r["attention"]],
                "step_ms": r["step_ms"],
                "achieved_gflops": achieved / 1e9,
                "fraction_of_matmul": achieved / rate,
                "vs_plain": r["vs_plain"],
            }
        )
    settings = {**result["settings"], "mode": mode, "matmul_size": matmul_size}
    if device.type == "cuda":
        settings["tf32"] = {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
    return {
        "settings": settings,
        "matmul": {
            "gflops": rate / 1e9,
            "gflops_before": mm_flops / statistics.median(before) / 1e9,
            "gflops_after": mm_flops / statistics.median(after) / 1e9,
        },
        "rows": rows,
    }


def format_efficiency(result: dict[str, Any]) -> str:
    st, mm = result["settings"], result["matmul"]
    lines = [
        f"{st['model']}, training step, batch {st['batch_size']}, "
        f"{st['input_size']}x{st['input_size']}, {st['mode']}, "
        f"{where(st)}, torch {st['torch']}, median of {st['repeats']} "
        "(round-robin)",
        machine_lines(st),
        f"fp32 matmul {st['matmul_size']}x{st['matmul_size']}: {mm['gflops']:.1f} GFLOP/s "
        f"(median; {mm['gflops_before']:.1f} before the steps, {mm['gflops_after']:.1f} after)",
        "| attention | train GFLOP / step | step ms | achieved GFLOP/s | of matmul rate "
        "| vs no attention |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        vs = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
        lines.append(
            f"| {r['attention']} | {r['train_flops_per_step'] / 1e9:.2f} | {r['step_ms']:.1f} "
            f"| {r['achieved_gflops']:.1f} | {100 * r['fraction_of_matmul']:.1f}% | {vs} |"
        )
    lines.append(
        "train FLOPs: forward + backward, torch.utils.flop_counter (conv/linear/matmul/"
        "attention products); elementwise work (BN, activations, gates, SGD) not counted."
    )
    if st.get("tf32"):
        lines.append(
            f"TF32: matmul {st['tf32']['matmul']}, cuDNN convolutions {st['tf32']['cudnn']} "
            "(TF32 convolutions against an fp32 reference can exceed 100%)."
        )
    return "\n".join(lines)
