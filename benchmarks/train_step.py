"""Time a training step side by side: execution modes and attention overheads.

    python benchmarks/train_step.py --model resnet20 --batch-size 128 \
        --attentions none se eca cbam ham --modes contiguous channels_last bf16

Prints a Markdown table: parameters (and the delta to the plain network), median step time
(ms), images/s, and the ratio to the first mode / to the plain network measured in the
same run. Modes and attentions are
interleaved round-robin so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

import attnzoo
from attnzoo.train.loss import training_loss


def make_step(model_name, attention, mode, batch, size, classes):
    torch.manual_seed(0)
    model = attnzoo.create_model(
        model_name, num_classes=classes, attention=None if attention == "none" else attention
    )
    fmt = torch.channels_last if mode in ("channels_last", "bf16") else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else nullcontext

    def step():
        with ctx():
            loss = training_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--attentions", nargs="+", default=["none"])
    p.add_argument("--modes", nargs="+", default=["channels_last"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [(a, m) for a in args.attentions for m in args.modes]
    built = {
        c: make_step(args.model, *c, args.batch_size, args.input_size, args.classes) for c in cases
    }
    steps = {c: b[0] for c, b in built.items()}
    params = {a: built[(a, args.modes[0])][1] for a in args.attentions}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {c: [] for c in cases}
    for _ in range(args.repeats):
        for c, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[c].append(time.perf_counter() - t0)
    med = {c: statistics.median(t) for c, t in times.items()}
    print(
        f"{args.model}, batch {args.batch_size}, {args.input_size}x{args.input_size}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}"
    )
    print(
        "| attention | params | delta | mode | step ms | images/s | vs first mode "
        "| vs no attention |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for a, m in cases:
        t = med[(a, m)]
        vs_mode = t / med[(a, args.modes[0])]
        base = med.get(("none", m))
        vs_plain = f"{t / base:.2f}x" if base else "-"
        delta = f"{params[a] - params['none']:+,}" if "none" in params else "-"
        print(
            f"| {a} | {params[a]:,} | {delta} | {m} | {1000 * t:.1f} | {args.batch_size / t:.0f} "
            f"| {vs_mode:.2f}x | {vs_plain} |"
        )


if __name__ == "__main__":
    main()
