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

An attention that ran out of memory at one (batch, size) is not tried at any later point
with a batch and a size at least as large (same batch: larger sizes; larger batches: the
same and larger sizes); those cells read "skipped (out of memory at ...)". Every other
point is still measured.

On CUDA (``device``, CLI ``--device``; the library defaults to the CPU, the CLI to
``auto``): the grid points run in this process, one after the other, on the GPU, timed as
``bench.py`` times on CUDA (at least one warm-up step, then a ``torch.cuda.Event`` pair
around each step, read after ``torch.cuda.synchronize``). The memory limit is the GPU's own:
a case whose step raises ``torch.cuda.OutOfMemoryError`` is reported as "out of memory"
(in the table, the JSON rows' ``status`` and as a cross in the plot), the CUDA cache is
emptied and the sweep goes on; ``memory_gib`` and the fresh processes apply to the CPU
only (an address-space cap would break CUDA's own reservations). ``--threads`` does not
apply either.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import torch

from ..utils.machine import machine_info
from .bench import (
    StepTimer,
    as_device,
    check_modes,
    device_settings,
    free_device_memory,
    is_device_oom,
    machine_lines,
    make_step,
    measuring_on,
    sync,
    where,
)

SWEEP_ATTENTIONS = ("none", "se", "eca", "cbam", "ham", "csm", "danet_pam", "rcca")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _is_oom(error: BaseException) -> bool:
    return (
        isinstance(error, MemoryError)
        or is_device_oom(error)
        or (isinstance(error, RuntimeError) and "allocate" in str(error))
    )


def _failure(error: BaseException) -> dict[str, Any]:
    status = "out of memory" if _is_oom(error) else "error"
    return {"status": status, "message": f"{type(error).__name__}: {error}"[:300]}


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
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """Round-robin step times of ``attentions`` at one (batch, size) on ``device``; per
    attention either ``{"status": "ok", "times": [s, ...], "params": n, "warmup_s": s}`` or
    ``{"status": "out of memory" | "error", "message": ...}``."""
    device = as_device(device)
    out: dict[str, dict[str, Any]] = {}
    steps = {}
    for a in attentions:
        try:
            step, params = make_step(
                model, a, mode, batch_size, input_size, num_classes, model_kwargs, device=device
            )
            t0 = time.perf_counter()
            for _ in range(max(warmup, 1)):  # one step at least: it is the memory probe
                step()
            sync(device)
            steps[a] = step
            out[a] = {"status": "ok", "times": [], "params": params}
            out[a]["warmup_s"] = time.perf_counter() - t0
        except (RuntimeError, MemoryError) as e:
            steps.pop(a, None)
            out[a] = _failure(e)
        step = None  # the failed case's model, if any, goes with the exception
        if out[a]["status"] != "ok":
            free_device_memory()
    timer = StepTimer(device)
    for _ in range(repeats):
        failed = False
        for a, step in list(steps.items()):
            try:
                timer(a, step)
            except (RuntimeError, MemoryError) as e:
                del steps[a]
                out[a] = _failure(e)
                failed = True
        step = None
        if failed:
            free_device_memory()
    times = timer.read()
    for a in steps:
        out[a]["times"] = times.get(a, [])
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
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Step time and ratio to the plain network of each attention at every (batch, size).

    Returns ``{"settings": ..., "rows": [...]}`` with one row per (batch, size, attention),
    in that order; a row's ``status`` is "ok", "skipped" (predicted step above
    ``max_step_s``, ``predicted_s`` says how long; or not tried after an out-of-memory
    error at a smaller point, ``message`` says where), "out of memory" or "error".
    ``isolate=False`` runs in this process without the memory cap (tests, quick looks); on
    CUDA the sweep always runs in this process (module docstring).
    """
    check_modes([mode])
    if mode == "compiled":
        raise ValueError("the sweep times eager-style modes; compiled recompiles per size")
    if min([repeats, num_classes, *batch_sizes, *input_sizes]) < 1 or warmup < 0:
        raise ValueError("batch sizes, input sizes, repeats and num_classes must be positive")
    device = as_device(device)
    cuda = device.type == "cuda"
    if cuda:
        isolate = False
        warmup = max(warmup, 1)
    attentions = ["none", *[a for a in attentions if a != "none"]]
    sizes = sorted(set(input_sizes))
    rows = []
    # attention -> the (batch, size) points where it ran out of memory
    out_of_memory: dict[str, list[tuple[int, int]]] = {a: [] for a in attentions}
    with measuring_on(device):
        for batch in batch_sizes:
            history: dict[str, list[tuple[int, float]]] = {a: [] for a in attentions}
            failed: dict[str, str] = {}  # attention -> why its larger sizes are not tried
            for size in sizes:
                positions = size * size
                predicted = {a: predict_step_s(history[a], positions) for a in attentions}
                for a in attentions:
                    # Needs at least the memory of a smaller point that did not fit.
                    smaller = [(b, s) for b, s in out_of_memory[a] if b <= batch and s <= size]
                    if a not in failed and smaller:
                        b, s = smaller[0]
                        failed[a] = f"out of memory at batch {b}, {s}x{s}"
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
                    device=str(device),
                )
                measured = (
                    _run_isolated(kwargs, memory_gib) if isolate else time_grid_point(**kwargs)
                )
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
                        if m["status"] == "out of memory":
                            out_of_memory[a].append((batch, size))
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
            **device_settings(device),
        },
        "rows": rows,
    }


def format_sweep(result: dict[str, Any]) -> str:
    """Markdown: per batch size, step ms and ratio to plain, one row per attention, one
    column pair per input size."""
    st = result["settings"]
    lines = [
        f"{st['model']}, training step, {st['mode']}, {where(st)}, "
        f"torch {st['torch']}, median of {st['repeats']} (round-robin at each size); "
        "each cell: step ms (ratio to no attention)",
        machine_lines(st),
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
    if any(r["status"] == "out of memory" for r in result["rows"]):
        if st["max_step_s"] is None:
            lines.append("")
        gpu = st.get("gpu")
        if gpu:
            limit = f"the {gpu.get('gpu_memory_gib')} GiB of {st['device']} (CUDA out of memory)"
        elif st.get("memory_gib") is not None:
            limit = f"the {st['memory_gib']:g} GiB address-space cap (--memory-gib)"
        else:
            limit = "this machine's memory"
        lines.append(
            f"out of memory: the step did not fit in {limit}; larger points of that "
            "attention were not tried."
        )
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """PNG of the ratio to the plain network against H*W, one panel per batch size; points
    that ran out of memory are crosses at the top edge, in the attention's colour."""
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
            oom = [
                r["positions"]
                for r in rows
                if r["attention"] == a and r["status"] == "out of memory"
            ]
            if not pts and not oom:
                continue
            xs, ys = zip(*pts, strict=True) if pts else ((), ())
            (line,) = ax.plot(xs, ys, marker="o", label=a)
            if oom:  # no ratio to draw: a cross at the top, at the H*W that did not fit
                ax.plot(
                    oom,
                    [0.96] * len(oom),
                    "x",
                    ms=9,
                    mew=2,
                    color=line.get_color(),
                    transform=ax.get_xaxis_transform(),
                )
            guess = [
                (r["positions"], r["predicted_vs_plain"])
                for r in rows
                if r["attention"] == a and r.get("predicted_vs_plain") is not None
            ]
            if guess and pts:  # skipped points: the prediction, dashed and hollow
                gx, gy = zip(*([pts[-1], *guess]), strict=True)
                ax.plot(gx, gy, "--", marker="o", mfc="none", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input H*W (positions of the first stage)")
        ax.set_ylabel("step time / plain step time")
        ax.set_title(
            f"{st['model']}, batch {batch}, {where(st)}\n"
            "(dashed: predicted, skipped; x at the top: out of memory)",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
