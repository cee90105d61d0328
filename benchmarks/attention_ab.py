"""Training-step time of the attention modules at an older revision against the working tree,
side by side in one process (round-robin, like ``attnzoo bench``).

    python benchmarks/attention_ab.py --before REV [--attentions se eca cbam ham triplet]
        [--model resnet56] [--repeats 5] [--warmup 1] [--threads 1]

``REV``'s ``attnzoo`` package is extracted with ``git archive`` into a temporary directory
and imported under another name, so both versions' models are built by their own code and
timed with the recipe of ``attnzoo bench`` (channels_last, batch 128, one SGD step).
Reported per attention: step time and ratio to the plain network for both versions, and
after / before.
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def import_revision(rev: str, where: Path):
    """``attnzoo`` as it was at ``rev``, imported as ``attnzoo_before``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "attnzoo"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    (where / "attnzoo").rename(where / "attnzoo_before")
    sys.path.insert(0, str(where))
    return importlib.import_module("attnzoo_before")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--attentions", nargs="+", default=["se", "eca", "cbam", "ham", "triplet"])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        before = import_revision(args.before, Path(tmp))

        def step(package, attention: str):
            torch.manual_seed(0)
            model = package.create_model(args.model, num_classes=10, attention=attention)
            model = model.to(memory_format=torch.channels_last).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (128,))

            def run() -> None:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return run

        import attnzoo

        cases = {("none", "after"): step(attnzoo, None)}
        for name in args.attentions:
            cases[(name, "before")] = step(before, name)
            cases[(name, "after")] = step(attnzoo, name)
        for run in cases.values():
            for _ in range(args.warmup):
                run()
        times = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case, run in cases.items():
                t0 = time.perf_counter()
                run()
                times[case].append(time.perf_counter() - t0)
    median = {case: statistics.median(t) for case, t in times.items()}
    plain = median[("none", "after")]
    print(
        f"{args.model}, training step, batch 128, 32x32, channels_last, {args.threads} thread(s), "
        f"median of {args.repeats} (round-robin); before = {args.before}"
    )
    print(f"plain network: {1000 * plain:.0f} ms")
    print(
        "| attention | before ms | before vs plain | after ms | after vs plain | after / before |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.attentions:
        b, a = median[(name, "before")], median[(name, "after")]
        print(
            f"| {name} | {1000 * b:.0f} | {b / plain:.2f}x | {1000 * a:.0f} | {a / plain:.2f}x "
            f"| {a / b:.2f}x |"
        )


if __name__ == "__main__":
    main()
