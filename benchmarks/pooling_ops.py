"""The op choices behind attnzoo/attention/layers.py's pooling helpers, timed side by side.

    python benchmarks/pooling_ops.py [--threads 1] [--repeats 20]

Forward + backward on a CIFAR stage-1 feature map (128 x 16 x 32 x 32, channels_last):
global max over H, W (amax vs adaptive_max_pool2d), max over channels (amax vs max), and
the 2 -> 1 7x7 spatial-gate conv on a contiguous vs a channels_last descriptor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(128, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    desc = torch.randn(256, 2, 32, 32)
    conv = torch.nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def grad_of(op, t):
        def run():
            leaf = t.detach().requires_grad_()
            op(leaf).sum().backward()

        return run

    pairs = [
        (
            "max over H, W",
            grad_of(lambda t: t.amax(dim=(2, 3)), x),
            grad_of(lambda t: F.adaptive_max_pool2d(t, 1), x),
            "amax",
            "adaptive_max_pool2d",
        ),
        (
            "max over C",
            grad_of(lambda t: t.amax(dim=1), x),
            grad_of(lambda t: t.max(dim=1).values, x),
            "amax",
            "max",
        ),
        (
            "7x7 conv 2->1",
            grad_of(conv, desc.contiguous()),
            grad_of(conv, desc.contiguous(memory_format=torch.channels_last)),
            "contiguous",
            "channels_last",
        ),
    ]
    print(f"{args.threads} thread(s), torch {torch.__version__}, median of {args.repeats}")
    print("| op | before | ms | after | ms | after / before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, before, after, b_name, a_name in pairs:
        tb, ta = timed(before, args.repeats), timed(after, args.repeats)
        print(f"| {name} | {b_name} | {tb:.1f} | {a_name} | {ta:.1f} | {ta / tb:.2f}x |")


if __name__ == "__main__":
    main()
