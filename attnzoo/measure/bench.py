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

Devices (``device``, CLI ``--device auto|cpu|cuda|cuda:N``; the library defaults to the CPU,
the CLI to ``auto``: CUDA when present):

- **CPU**: each step is timed with ``time.perf_counter`` around the call, which returns when
  the step is done; ``--threads`` sets torch's intra-op threads.
- **CUDA**: model, inputs and targets live on the GPU, ``cudnn.benchmark`` is on
  (``train.fastpath.configure_device``), and at least one untimed warm-up step runs per case
  (it holds cuDNN's algorithm search and the lazy initialisation). Each timed step is a pair
  of ``torch.cuda.Event(enable_timing=True)`` recorded on the stream before and after it;
  the elapsed times are read after ``torch.cuda.synchronize``, so they are the GPU's time
  from the step's first kernel to its last, including any wait for the CPU to launch them.
  ``--threads`` does not apply. The table's machine lines name the GPU, then the CPU.

A case that runs out of GPU memory (``torch.cuda.OutOfMemoryError``) stops the bench with
``DeviceOutOfMemory``: one line naming the model, attention, batch size and the fix (a
smaller ``--batch-size``); the CUDA cache is emptied first.

With ``timm=True`` every attention that timm also implements (se, eca, cbam) is timed a
second time with timm's layer in its place, same weights (``timm_compare.py``; the outputs
are checked equal before timing, on the CPU in fp32, then the model moves to the device),
and the table gains "ours / timm", our step time over timm's in the same mode. Attentions
timm lacks are timed once, as usual.

With ``kernels_ab=True`` (CLI ``--kernels``) every attention is timed a second time with the
fused gate kernels off (``attnzoo.kernels``, ``ATTNZOO_KERNELS=off``: the PyTorch path), in
the same round-robin, and the table gains "kernels / off". The header's "Gates:" line names
the path the kernel rows took (C++, Triton, or PyTorch with the reason). With
``inference=True`` (``--inference``) the timed step is an eval-mode forward without grad.

The helpers the other measurements share live here: ``as_device``, ``measuring_on`` (the
CUDA settings for a measurement, restored after it), ``StepTimer`` (the timing of both
devices), ``is_device_oom`` / ``free_device_memory`` / ``DeviceOutOfMemory``, and the header
helpers ``where`` and ``machine_lines``.
"""

from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .. import kernels
from ..registry import NO_ATTENTION, create_model
from ..train.fastpath import autocast, configure_device, device_info, resolve_device
from ..train.loss import training_loss
from ..utils.machine import machine_info, machine_line
from ..utils.text import plural
from .timm_compare import TIMM_ATTENTIONS, require_timm, swap_in_timm

MODES = ("eager", "channels_last", "bf16", "compiled")
KERNELS_OFF = "kernels off"


def check_modes(modes: list[str]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")


# ------------------------------------------------------------------ devices and timing
def as_device(device: str | torch.device) -> torch.device:
    """A ``--device`` setting ('auto', 'cpu', 'cuda', 'cuda:N') or a torch.device, checked:
    a CUDA device that is not there raises ``ValueError`` naming what is."""
    if isinstance(device, torch.device):
        device = str(device)
    return resolve_device(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (the CPU's calls return when done already)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Seconds per call of a function, collected per key.

    On the CPU ``time.perf_counter`` around the call. On CUDA a pair of timing events
    recorded on the current stream before and after the call, read (``read``) after
    ``torch.cuda.synchronize``: no synchronisation between the timed calls, so the GPU's
    queue stays as full as in training."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._times: dict[Hashable, list[float]] = {}
        self._pending: list[tuple[Hashable, Any, Any]] = []

    def __call__(self, key: Hashable, fn: Callable[[], object]) -> None:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            self._times.setdefault(key, []).append(time.perf_counter() - t0)
            return
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        self._pending.append((key, start, end))

    def read(self) -> dict[Hashable, list[float]]:
        """Every key's seconds so far, in call order."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for key, start, end in self._pending:
                self._times.setdefault(key, []).append(start.elapsed_time(end) / 1000)
            self._pending.clear()
        return self._times


# cuDNN and cuBLAS report a failed workspace allocation in their own words.
_DEVICE_OOM_TEXT = ("CUDA out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_device_oom(error: BaseException) -> bool:
    """The GPU ran out of memory (``torch.cuda.OutOfMemoryError``, or cuDNN/cuBLAS failing
    to allocate their workspace)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(t in str(error) for t in _DEVICE_OOM_TEXT)
    )


def free_device_memory() -> None:
    """After an out-of-memory error: collect what the failed case left and hand the CUDA
    caching allocator's free blocks back, so that the next case starts from a clean pool.
    Call it outside the ``except`` block: the exception's traceback holds the tensors."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def oom_detail(error: BaseException) -> str:
    """'tried to allocate 2.00 GiB' from torch's message, or ''."""
    found = re.search(r"Tried to allocate ([\d.]+ [KMGTP]?i?B)", str(error))
    return f"tried to allocate {found.group(1)}" if found else ""


class DeviceOutOfMemory(RuntimeError):
    """A measured case did not fit in the GPU's memory; the message is one line naming the
    case and the fix."""

    def __init__(
        self,
        model: str,
        attention: str | None,
        batch_size: int,
        input_size: int,
        device: torch.device | str,
        detail: str = "",
    ) -> None:
        self.model, self.attention, self.batch_size = model, attention, batch_size
        what = f"{model} with attention {attention or 'none'}"
        extra = f" ({detail})" if detail else ""
        smaller = max(batch_size // 2, 1)
        super().__init__(
            f"out of memory on {device}: {what} at batch size {batch_size}, "
            f"{input_size}x{input_size} input{extra}; try a smaller --batch-size "
            f"(e.g. --batch-size {smaller})"
        )


def device_settings(device: torch.device) -> dict[str, Any]:
    """What a result's settings record about the device and how it was timed."""
    settings: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        settings["gpu"] = device_info(device)
        settings["timing"] = "torch.cuda.Event pairs, read after torch.cuda.synchronize"
    else:
        settings["timing"] = "time.perf_counter"
    return settings


@contextmanager
def measuring_on(device: torch.device) -> Iterator[None]:
    """On CUDA, ``configure_device`` (``cudnn.benchmark`` on) for the measurement and the
    previous ``cudnn.benchmark`` back afterwards, so that a library call leaves the process's
    settings as it found them; nothing on the CPU."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    configure_device(device)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def where(settings: dict[str, Any]) -> str:
    """The header's 'N threads' on the CPU; the device on CUDA (threads do not apply)."""
    if settings.get("gpu"):
        return f"{settings['device']} (CUDA events)"
    return plural(settings["threads"], "thread")


def machine_lines(settings: dict[str, Any]) -> str:
    """The 'CPU: ...' line, after a 'GPU: ...' line when measured on CUDA."""
    gpu = settings.get("gpu")
    if not gpu:
        return machine_line(settings)
    return (
        f"GPU: {gpu.get('gpu')} ({gpu.get('gpu_memory_gib')} GiB) as {gpu.get('device')}, "
        f"CUDA {gpu.get('cuda')}, cuDNN {gpu.get('cudnn')}\n" + machine_line(settings)
    )


# ------------------------------------------------------------------ the bench
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
    device: torch.device | str = "cpu",
    kernels_mode: str | None = None,
    inference: bool = False,
):
    """A closure running one SGD training step on ``device`` (with ``inference``: one
    forward in eval mode without grad), and the model's parameter count.

    ``kernels_mode`` runs the step under ``attnzoo.kernels.kernels(mode)`` (None: the
    process's mode).

    ``impl="timm"`` replaces our attention modules by timm's with the same weights (checked
    on the CPU, before the move to ``device``); the check's result goes into ``check`` when
    given."""
    device = torch.device(device)
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
    model = model.to(device, memory_format=fmt).train(not inference)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model) if mode == "compiled" else model
    # Drawn on the CPU, as before devices: the same numbers on every device.
    x = torch.randn(batch, getattr(model, "in_chans", 3), size, size)
    x = x.to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,)).to(device)
    precision = "bf16" if mode == "bf16" else "fp32"

    def gates() -> contextlib.AbstractContextManager:
        return kernels.kernels(kernels_mode) if kernels_mode else contextlib.nullcontext()

    def train_step() -> None:
        with gates(), autocast(precision, device):
            loss = training_loss(run(x), y)
        opt.zero_grad(set_to_none=True)
        with gates():
            loss.backward()
        opt.step()

    def inference_step() -> None:
        with gates(), torch.no_grad(), autocast(precision, device):
            run(x)

    return (inference_step if inference else train_step), params


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
    device: str | torch.device = "cpu",
    kernels_ab: bool = False,
    inference: bool = False,
) -> dict[str, Any]:
    """Time every (attention, mode) case on ``device``; see the module docstring.

    Raises ``DeviceOutOfMemory`` when a case does not fit in the GPU's memory."""
    check_modes(modes)
    if min(batch_size, input_size, num_classes, repeats) < 1 or warmup < 0:
        raise ValueError("batch_size, input_size, num_classes and repeats must be positive")
    device = as_device(device)
    if timm:
        require_timm()
    if device.type == "cuda":
        warmup = max(warmup, 1)  # the first step holds cuDNN's algorithm search
    with measuring_on(device):
        cases = []
        for a in attentions:
            for m in modes:
                cases.append((a, "ours", m))
                if kernels_ab:
                    cases.append((a, KERNELS_OFF, m))
                if timm and a in TIMM_ATTENTIONS:
                    cases.append((a, "timm", m))
        steps, params, setup = {}, {}, {}
        checks: dict[str, dict] = {}
        timer = StepTimer(device)
        current = cases[0] if cases else None
        oom = None
        try:
            for case in cases:
                current = case
                a, impl, m = case
                steps[case], params[(a, impl)] = make_step(
                    model,
                    a,
                    m,
                    batch_size,
                    input_size,
                    num_classes,
                    model_kwargs,
                    impl="ours" if impl == KERNELS_OFF else impl,
                    check=checks.setdefault(a, {}) if impl == "timm" else None,
                    device=device,
                    kernels_mode="off" if impl == KERNELS_OFF else None,
                    inference=inference,
                )
            for case, step in steps.items():
                current = case
                t0 = time.perf_counter()
                for _ in range(max(warmup, 1 if case[2] == "compiled" else 0)):
                    step()
                sync(device)
                setup[case] = time.perf_counter() - t0
            for _ in range(repeats):
                for case, step in steps.items():
                    current = case
                    timer(case, step)
            times = timer.read()
        except RuntimeError as e:
            if not is_device_oom(e):
                raise
            a, impl, _ = current
            name = a + (" (timm)" if impl == "timm" else "")
            oom = DeviceOutOfMemory(model, name, batch_size, input_size, device, oom_detail(e))
        if oom is not None:
            steps.clear()
            step = None  # noqa: F841  (the closures hold the models)
            free_device_memory()
            raise oom
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
        if timm or kernels_ab:
            row["impl"] = impl
        if timm:
            # ours / timm, on the timm row (ours is the row just above it).
            row["ours_over_timm"] = median[(a, "ours", m)] / t if impl == "timm" else None
        if kernels_ab:
            # the kernels' row over the PyTorch path's, on the kernels-off row
            off_base = median.get(("none", KERNELS_OFF, m))
            if impl == KERNELS_OFF:
                row["vs_plain"] = t / off_base if off_base else None
            row["kernels_over_off"] = median[(a, "ours", m)] / t if impl == KERNELS_OFF else None
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
            "step": "inference (eval, no grad)" if inference else "training",
            "gates": kernels.describe(device),
            "machine": machine_info(),
            **device_settings(device),
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
    ab = any("kernels_over_off" in r for r in rows)
    plain = {r["mode"]: r["params"] for r in rows if r["attention"] == "none"}
    lines = [
        f"{st['model']}, {st.get('step', 'training')} step, batch {st['batch_size']}, "
        f"{st['input_size']}x{st['input_size']}, {where(st)}, "
        f"torch {st['torch']}"
        + (f", timm {st['timm']}" if timm else "")
        + f", median of {st['repeats']} (round-robin)",
        machine_lines(st),
        f"Gates: {st.get('gates', 'PyTorch')}"
        + ("; the 'kernels off' rows take the PyTorch path (ATTNZOO_KERNELS=off)" if ab else ""),
        "| attention | mode | params | delta | step ms | images/s | vs no attention "
        "| vs first mode | warm-up s |"
        + (" ours / timm |" if timm else "")
        + (" kernels / off |" if ab else ""),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        + (" --- |" if timm else "")
        + (" --- |" if ab else ""),
    ]
    for r in rows:
        base = plain.get(r["mode"])
        delta = f"{r['params'] - base:+,}" if base is not None else "-"
        vs_plain = f"{r['vs_plain']:.2f}x" if r["vs_plain"] else "-"
        impl = r.get("impl")
        name = r["attention"] + (f" ({impl})" if impl in ("timm", KERNELS_OFF) else "")
        line = (
            f"| {name} | {r['mode']} | {r['params']:,} | {delta} | {r['step_ms']:.1f} "
            f"| {r['images_per_s']:.0f} | {vs_plain} | {r['vs_first_mode']:.2f}x "
            f"| {r['warmup_s']:.1f} |"
        )
        if timm:
            ratio = r.get("ours_over_timm")
            line += f" {ratio:.2f}x |" if ratio is not None else " - |"
        if ab:
            ratio = r.get("kernels_over_off")
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
