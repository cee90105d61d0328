"""How each attention's training-step cost grows with the input size: ``attnzoo bench --sweep``.

``attnzoo bench --sweep --model resnet20 --batch-sizes 8 32 --input-sizes 32 64 96 224``

For every (batch size, input size) grid point, every attention and the plain network are
timed round-robin in one process (``bench.py``'s method), so the ratio to the plain network
at that size is the comparable number. Rows give the step time, images/s and that ratio;
``H*W`` is the input's positions, which on the CIFAR backbones (stride-1 stem) is also the
first stage's map, where position attention is most expensive.

What grows how (per image, C channels, N = H*W positions): the gates (se, eca, cbam, ham)
add O(N C) work, like the convolutions, so their ratio stays roughly flat; position
attention (csm, danet_pam) is O(N^2 C'), so its ratio grows about linearly in N; criss-cross
attention (rcca) attends along a row and a column, O(N (H + W) C'), about N^1.5.

Two guards keep the sweep finishing in minutes on a CPU, and neither hides anything (the
table says what was skipped and why):

- **time**: before a grid point, each attention's step time is predicted from its two
  previous sizes at the same batch (t ~ (H*W)^e with the measured e, clipped to [1, 2.5];
  e = 2 after one size). If the prediction exceeds ``max_step_s``, that point is skipped
  and the row shows the prediction instead of a measurement.
- **memory**: each grid point runs in a fresh process whose address space is capped at its
  starting size plus ``memory_gib`` (``RLIMIT_AS``). A case whose step cannot allocate is
  reported as "out of memory" instead of swapping the machine or waking the OOM killer.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import torch

from ..utils.machine import machine_info, machine_line
from ..utils.text import plural
from .bench import check_modes, make_step

SWEEP_ATTENTIONS = ("none", "se", "eca", "cbam", "ham", "csm", "danet_pam", "rcca")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "allocate" in str(error)
    )


def time_grid_point(
    model: str,
    attentions: list[str],
    batch_size: int,
    input_size: int,
    mode: str = "channels_last",
    repeats: int = 3,
    warmup: int = 1,
    num_classes: int = 10,
    model_kwargs: dict | None = None,
) -> dict[str, dict[str, Any]]:
    """Round-robin step times of ``attentions`` at one (batch, size); per attention either
    ``{"status": "ok", "times": [s, ...], "params": n, "warmup_s": s}`` or
    ``{"status": "out of memory" | "error", "message": ...}``."""
    out: dict[str, dict[str, Any]] = {}
    steps = {}
    for a in attentions:
        try:
            step, params = make_step(
                model, a, mode, batch_size, input_size, num_classes, model_kwargs
            )
            t0 = time.perf_counter()
            for _ in range(max(warmup, 1)):  # one step at least: it is the memory probe
                step()
            steps[a] = step
            out[a] = {"status": "ok", "times": [], "params": params}
            out[a]["warmup_s"] = time.perf_counter() - t0
        except (RuntimeError, MemoryError) as e:
            steps.pop(a, None)
            status = "out of memory" if _is_oom(e) else "error"
            out[a] = {"status": status, "message": f"{type(e).__name__}: {e}"[:300]}
    for _ in range(repeats):
        for a, step in list(steps.items()):
            t0 = time.perf_counter()
            try:
                step()
            except (RuntimeError, MemoryError) as e:
                del steps[a]
                status = "out of memory" if _is_oom(e) else "error"
                out[a] = {"status": status, "message": f"{type(e).__name__}: {e}"[:300]}
                continue
            out[a]["times"].append(time.perf_counter() - t0)
    return out


def _grid_child(kwargs: dict, threads: int, memory_gib: float | None, conn) -> None:
    try:
        torch.set_num_threads(threads)
        # Start torch's worker threads before the cap: a thread's stack is address space.
        torch.mm(torch.ones(256, 256), torch.ones(256, 256))
        if memory_gib is not None:
            limit = _vm_size_bytes() + int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = ("ok", time_grid_point(**kwargs))
    except BaseException as e:  # report to the parent instead of dying silently
        result = ("error", f"{type(e).__name__}: {e}")
    conn.send(result)  # a pipe: no feeder thread to start under the cap
    conn.close()


def _run_isolated(kwargs: dict, memory_gib: float | None) -> dict[str, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_grid_child, args=(kwargs, torch.get_num_threads(), memory_gib, child)
    )
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:  # the child died without a word (killed, crashed)
        proc.join()
        if memory_gib is not None and proc.exitcode is not None and proc.exitcode < 0:
            # Under an address-space cap, native code (oneDNN, OpenMP) may fail an
            # allocation with a crash instead of an exception: that is running out of
            # memory too, for every case of this grid point.
            why = f"the process died (signal {-proc.exitcode}) under the {memory_gib:g} GiB cap"
            return {a: {"status": "out of memory", "message": why} for a in kwargs["attentions"]}
        status, value = "error", f"exit code {proc.exitcode}"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"sweep grid point failed: {value}")
    return value


def predict_step_s(history: list[tuple[int, float]], positions: int) -> float | None:
    """Step time at ``positions`` from earlier (positions, seconds) points, or None."""
    if not history:
        return None
    (n2, t2) = history[-1]
    exponent = 2.0
    if len(history) >= 2:
        n1, t1 = history[-2]
        if n2 != n1 and t1 > 0:
            exponent = min(max(math.log(t2 / t1) / math.log(n2 / n1), 1.0), 2.5)
    return t2 * (positions / n2) ** exponent


def sweep(
    model: str = "resnet20",
    attentions: list[str] | tuple[str, ...] = SWEEP_ATTENTIONS,
    batch_sizes: list[int] | tuple[int, ...] = (8, 32),
    input_sizes: list[int] | tuple[int, ...] = (32, 64, 96, 224),
    mode: str = "channels_last",
    repeats: int = 2,
    warmup: int = 1,
    num_classes: int = 10,
    max_step_s: float | None = 30.0,
    memory_gib: float | None = 8.0,
    isolate: bool = True,
    model_kwargs: dict | None = None,
) -> dict[str, Any]:
    """Step time and ratio to the plain network of each attention at every (batch, size).

    Returns ``{"settings": ..., "rows": [...]}`` with one row per (batch, size, attention),
    in that order; a row's ``status`` is "ok", "skipped" (predicted step above
    ``max_step_s``; ``predicted_s`` says how long), "out of memory" or "error".
    ``isolate=False`` runs in this process without the memory cap (tests, quick looks).
    """
    check_modes([mode])
    if mode == "compiled":
        raise ValueError("the sweep times eager-style modes; compiled recompiles per size")
    if min([repeats, num_classes, *batch_sizes, *input_sizes]) < 1 or warmup < 0:
        raise ValueError("batch sizes, input sizes, repeats and num_classes must be positive")
    attentions = ["none", *[a for a in attentions if a != "none"]]
    sizes = sorted(set(input_sizes))
    rows = []
    for batch in batch_sizes:
        history: dict[str, list[tuple[int, float]]] = {a: [] for a in attentions}
        failed: dict[str, str] = {}  # attention -> why its larger sizes are not tried
        for size in sizes:
            positions = size * size
            predicted = {a: predict_step_s(history[a], positions) for a in attentions}
            run = [
                a
                for a in attentions
                if a not in failed
                and (
                    a == "none"
                    or max_step_s is None
                    or predicted[a] is None
                    or predicted[a] <= max_step_s
                )
            ]
            kwargs = dict(
                model=model,
                attentions=run,
                batch_size=batch,
                input_size=size,
                mode=mode,
                repeats=repeats,
                warmup=warmup,
                num_classes=num_classes,
                model_kwargs=model_kwargs,
            )
            measured = _run_isolated(kwargs, memory_gib) if isolate else time_grid_point(**kwargs)
            plain = measured.get("none", {})
            plain_s = statistics.median(plain["times"]) if plain.get("times") else None
            for a in attentions:
                row: dict[str, Any] = {
                    "batch_size": batch,
                    "input_size": size,
                    "positions": positions,
                    "attention": a,
                    "status": "skipped",
                    "step_ms": None,
                    "images_per_s": None,
                    "vs_plain": None,
                }
                m = measured.get(a)
                if a in failed:
                    row["message"] = failed[a]
                elif m is None:
                    row["predicted_s"] = predicted[a]
                    row["predicted_vs_plain"] = predicted[a] / plain_s if plain_s else None
                elif m["status"] != "ok":
                    row.update(status=m["status"], message=m["message"])
                    failed[a] = f"{m['status']} at {size}x{size}"
                else:
                    t = statistics.median(m["times"]) if m["times"] else m["warmup_s"]
                    history[a].append((positions, t))
                    row.update(
                        status="ok",
                        params=m["params"],
                        step_ms=1000 * t,
                        images_per_s=batch / t,
                        vs_plain=t / plain_s if plain_s else None,
                    )
                rows.append(row)
    return {
        "settings": {
            "model": model,
            "mode": mode,
            "batch_sizes": list(batch_sizes),
            "input_sizes": sizes,
            "repeats": repeats,
            "warmup": warmup,
            "max_step_s": max_step_s,
            "memory_gib": memory_gib if isolate else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": machine_info(),
        },
        "rows": rows,
    }


def format_sweep(result: dict[str, Any]) -> str:
    """Markdown: per batch size, step ms and ratio to plain, one row per attention, one
    column pair per input size."""
    st = result["settings"]
    lines = [
        f"{st['model']}, training step, {st['mode']}, {plural(st['threads'], 'thread')}, "
        f"torch {st['torch']}, median of {st['repeats']} (round-robin at each size); "
        "each cell: step ms (ratio to no attention)",
        machine_line(st),
    ]
    sizes = st["input_sizes"]
    for batch in st["batch_sizes"]:
        rows = [r for r in result["rows"] if r["batch_size"] == batch]
        attentions = list(dict.fromkeys(r["attention"] for r in rows))
        lines += [
            "",
            f"batch {batch}",
            "| attention | " + " | ".join(f"{s}x{s} (H*W {s * s:,})" for s in sizes) + " |",
            "| --- |" + " --- |" * len(sizes),
        ]
        cell = {(r["attention"], r["input_size"]): r for r in rows}
        for a in attentions:
            cells = []
            for s in sizes:
                r = cell[(a, s)]
                if r["status"] == "ok":
                    ratio = f" ({r['vs_plain']:.2f}x)" if r["vs_plain"] else ""
                    cells.append(f"{r['step_ms']:.0f}{ratio}")
                elif r["status"] == "skipped" and r.get("predicted_s") is not None:
                    cells.append(f"skipped (predicted {r['predicted_s']:.0f} s/step)")
                elif r["status"] == "skipped":
                    cells.append(f"skipped ({r['message']})")
                else:
                    cells.append(r["status"])
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if st["max_step_s"] is not None:
        lines.append("")
        lines.append(
            f"skipped: the step time predicted from the two smaller sizes exceeded "
            f"{st['max_step_s']:g} s (--max-step-s)."
        )
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """PNG of the ratio to the plain network against H*W, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["settings"]
    batches = st["batch_sizes"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = [r for r in result["rows"] if r["batch_size"] == batch]
        for a in dict.fromkeys(r["attention"] for r in rows):
            pts = [
                (r["positions"], r["vs_plain"])
                for r in rows
                if r["attention"] == a and r["vs_plain"] is not None
            ]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=a)
            guess = [
                (r["positions"], r["predicted_vs_plain"])
                for r in rows
                if r["attention"] == a and r.get("predicted_vs_plain") is not None
            ]
            if guess:  # skipped points: the prediction, dashed and hollow, not a measurement
                gx, gy = zip(*([pts[-1], *guess]), strict=True)
                ax.plot(gx, gy, "--", marker="o", mfc="none", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input H*W (positions of the first stage)")
        ax.set_ylabel("step time / plain step time")
        ax.set_title(
            f"{st['model']}, batch {batch}, {plural(st['threads'], 'thread')} (dashed: predicted, skipped)"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
