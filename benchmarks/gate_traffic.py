"""Time inside the gate kernels during a resnet56 training step, the map traffic they move,
and the machine's memory bandwidth, side by side (docs/performance.md, "What limits it").

    python benchmarks/gate_traffic.py [--threads 1] [--attentions none se cbam ham triplet]

Each kernel call of ``attnzoo.kernels.cpu`` is timed in the network (batch 128, CIFAR
input, channels_last, fp32); "map traffic" counts the full-size reads and writes of the map
per call (pool 1, dot 2, apply 2, backward 2; the spatial convs read small maps and count
0). The bandwidth line: ``x.sum()`` (read) and ``copy_`` (read + write) over 256 MB.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

import attnzoo
from attnzoo.kernels import cpu
from attnzoo.utils.machine import machine_info, machine_line

TRAFFIC = {
    "pool": 1,
    "dot": 2,
    "apply": 2,
    "backward": 2,
    "tri_pool": 1,
    "tri_dot": 2,
    "tri_broadcast": 2,
    "conv": 0,
    "conv_grad_input": 0,
    "conv_grad_weight": 0,
}
CONVS = ("conv", "conv_grad_input", "conv_grad_weight")


def median_time(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attentions", nargs="+", default=["none", "se", "cbam", "ham", "triplet"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit(f"no C++ gate kernels: {cpu.reason()}")
    settings = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": machine_info(),
    }
    print(machine_line(settings))
    big = torch.randn(64 * 2**20)
    out = torch.empty_like(big)
    gb = big.numel() * 4 / 1e9
    print(
        f"bandwidth: read {gb / median_time(big.sum):.1f} GB/s, "
        f"copy {2 * gb / median_time(lambda: out.copy_(big)):.1f} GB/s (read + write)"
    )
    spent: collections.Counter = collections.Counter()
    moved: collections.Counter = collections.Counter()
    for name, passes in TRAFFIC.items():
        real = getattr(cpu, name)

        def timed(*a, _real=real, _name=name, _passes=passes, **k):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            result = _real(*a, **k)
            spent[_name] += time.perf_counter() - start
            moved[_name] += _passes * a[0].numel() * a[0].element_size()
            return result

        setattr(cpu, name, timed)
    x = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    print(
        "| attention | step ms | in the kernels ms | of which convs ms | map traffic MB | achieved GB/s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for att in args.attentions:
        torch.manual_seed(0)
        model = attnzoo.create_model(
            "resnet56", num_classes=10, attention=None if att == "none" else att
        )
        model = model.to(memory_format=torch.channels_last).train()

        def step(model=model) -> None:  # noqa: ANN001
            torch.nn.functional.cross_entropy(model(x), y).backward()

        step()
        steps = []
        for _ in range(3):
            spent.clear()
            moved.clear()
            start = time.perf_counter()
            step()
            steps.append(time.perf_counter() - start)
        total = sum(spent.values())
        convs = sum(spent[c] for c in CONVS)
        traffic = sum(moved.values()) / 1e9
        rate = traffic / (total - convs) if total > convs else 0.0
        print(
            f"| {att} | {statistics.median(steps) * 1e3:.0f} | {total * 1e3:.0f} | {convs * 1e3:.0f} "
            f"| {traffic * 1e3:.0f} | {rate:.1f} |"
        )


if __name__ == "__main__":
    main()
