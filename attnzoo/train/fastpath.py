"""The fast training path: which device, whether to ``torch.compile``, which precision, and
what to pick per device.

Device (``TrainConfig.device``, CLI ``--device auto|cpu|cuda|cuda:N``): ``resolve_device``
turns ``auto`` into CUDA when torch sees a GPU, else the CPU; a CUDA device that is absent is
one clear error. ``configure_device`` sets the CUDA switches of a run: ``cudnn.benchmark`` (the
shapes of a training run repeat, so the algorithm search pays), or with ``deterministic``
torch's deterministic algorithms, cuDNN's deterministic mode and cuBLAS's fixed workspace.
On CUDA the training loop also checks the loss and stop requests every ``SYNC_EVERY`` steps
instead of every step (engine.py), so that Python never waits for the GPU. These CUDA rules
are the standard practice, not yet measured here: no GPU has run this code so far
(``benchmarks/gpu_check.sh`` is the check to run on one).

Precision (``TrainConfig.precision``, CLI ``--precision auto|fp32|bf16``). ``auto`` is
resolved when a run starts by ``decide_precision`` and recorded in every checkpoint; a resume
keeps it. On the CPU, ``auto`` is bf16 autocast where the CPU has bf16 instructions
(AVX-512 bf16, or AMX bf16 tiles) and torch runs its AVX-512 kernels, and fp32 everywhere
else, because bf16's speed depends on the CPU, not on the code. Measured with ``attnzoo bench
--model resnet56 --attentions none se cbam ham --modes channels_last bf16 --repeats 5`` (2
threads), bf16 step time over fp32 (docs/performance.md, "bf16 by CPU"):

| CPU | plain | SE | CBAM | HAM |
| --- | --- | --- | --- | --- |
| Intel, AMX bf16 + AVX-512 bf16 (issue 11's machine) | 0.59x | 0.65x | 0.77x | 0.77x |
| AMD EPYC, AVX-512 bf16, no AMX (machine B of docs/performance.md) | 0.68x | 0.72x | 0.89x | 0.85x |
| no bf16 instructions (the first machine of docs/performance.md) | 11.5x | | | |

A forced lower ``ATEN_CPU_CAPABILITY`` gives fp32 (torch's bf16 kernels need AVX-512 there).
``fp16`` (autocast plus a gradient scaler, ``grad_scaler``, whose state every checkpoint
holds) is for CUDA devices; on the CPU it is refused with the reason. On CUDA, ``auto`` is
bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else fp32: fp16 needs its
scaler and is asked for explicitly.

``TrainConfig.compile`` is ``"auto"`` (the default), ``True`` or ``False``. ``auto`` is
resolved when a run starts, by ``decide_compile``; every checkpoint records the choice
(``"compiled"``) and a resume keeps it, whatever the rule would say on the resuming machine
(a resume is exact only if both halves ran the same kind of step; checkpoints from before
the setting resume eagerly).

The rule for ``auto``: compile when the whole run's planned optimizer steps repay the
compile time with a conservative margin,

    planned_steps >= MIN_COMPILED_STEPS  and
    planned_steps * step_seconds * COMPILE_SAVING >= COMPILE_SECONDS

with the measured numbers of this project's CPU (docs/performance.md, "torch.compile"):
compiling a ResNet-56 took 84-271 s (``COMPILE_SECONDS`` = 300, above the worst) and saved
4-20% of a training step (``COMPILE_SAVING`` = 0.04, the least). ``step_seconds`` is
estimated without running anything: the model's forward multiply-accumulates per image
(``torch.utils.flop_counter`` on one image) times 3 for forward + backward times the batch,
over ``CPU_MACS_PER_SECOND_PER_THREAD`` times the torch threads (measured: a plain ResNet-56
step at batch 128 runs at about 2.4e10 MAC/s on one thread). The estimate ignores the
memory-bound elementwise work, so it errs low, which only makes ``auto`` compile less often.
A 200-epoch CIFAR ResNet run (78,000 steps, about 1 s each) compiles; a digits run (a few
hundred steps), a smoke run or a unit test does not.

Attentions whose fused eager gates (``attention/layers.py``) beat what the compiler makes of
the plain expression get a saving of 0, so ``auto`` leaves them eager: measured on a
ResNet-56 (docs/performance.md, "Fused attention gates"), compiled / eager step time was
0.94x without attention, 0.90x with SE, 0.95x with ECA, but 1.01x with CBAM, 1.05x with HAM
and 1.08x with triplet (``COMPILE_SAVING_BY_ATTENTION``).
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from ..utils.machine import has_bf16_instructions

COMPILE_CHOICES = ("auto", True, False)
COMPILE_SECONDS = 300.0
COMPILE_SAVING = 0.04
# The step-time saving from compiling, where measured to differ from COMPILE_SAVING.
COMPILE_SAVING_BY_ATTENTION = {"cbam": 0.0, "ham": 0.0, "triplet": 0.0}
MIN_COMPILED_STEPS = 2_000
CPU_MACS_PER_SECOND_PER_THREAD = 2.4e10

# What the fast path picks on each device (the TrainConfig docstring has the reasons).
DEVICE_CHOICES: dict[str, dict[str, Any]] = {
    "cpu": {"channels_last": True, "autocast": "bfloat16 if bf16 instructions", "compile": "auto"},
    "cuda": {
        "channels_last": True,
        "autocast": "bfloat16 if supported",
        "compile": "off until measured on a GPU",
        "cudnn_benchmark": "unless deterministic",
    },
}


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value: Any) -> None:
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")


def cpu_prefers_bf16() -> bool:
    """bf16 autocast beats fp32 on this CPU: it has bf16 instructions (AVX-512 bf16 or AMX
    bf16) and torch runs its AVX-512 kernels (a forced lower ``ATEN_CPU_CAPABILITY`` does not)."""
    return has_bf16_instructions() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _device_type(device: Any) -> str:
    return torch.device(device).type if not isinstance(device, str) else device.split(":")[0]


def decide_precision(setting: Any, device: Any = "cpu") -> tuple[str, str]:
    """Resolve ``precision`` ('auto', 'fp32', 'bf16', 'fp16') for a run on ``device``:
    (precision, why)."""
    check_precision(setting)
    kind = _device_type(device)
    if kind == "cpu" and setting == "fp16":
        raise ValueError(
            "precision fp16 needs a CUDA device (it trains with a gradient scaler); on the CPU "
            "use bf16 or fp32"
        )
    if setting != "auto":
        return setting, f"precision {setting}"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: bf16 autocast, which this GPU supports"
        return "fp32", "auto: fp32, as this GPU has no bf16 (ask for fp16 to use a grad scaler)"
    if cpu_prefers_bf16():
        return "bf16", "auto: bf16 autocast, faster than fp32 on this CPU's bf16 instructions"
    return "fp32", "auto: fp32, as this CPU (or the forced ATen level) has no fast bf16"


def autocast(precision: str, device: Any = "cpu") -> AbstractContextManager:
    """The forward pass's autocast context for a resolved precision (none for fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(_device_type(device), dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: Any = "cpu") -> torch.amp.GradScaler | None:
    """fp16 trains with a gradient scaler (its state goes into the checkpoint); bf16 and fp32
    need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(_device_type(device))


# ------------------------------------------------------------------ devices
# On a GPU the training loop reads the loss's finiteness and the stop requests (a host
# synchronisation, and a collective with several processes) every SYNC_EVERY steps and before
# every checkpoint, not every step: the GPU then runs ahead of Python. A non-finite loss still
# stops the run before any checkpoint follows it; Ctrl-C stops within SYNC_EVERY steps.
SYNC_EVERY = 50
DEVICE_SETTINGS = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(value: Any) -> None:
    """``--device``: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise ValueError(f"device must be {DEVICE_SETTINGS}, got {value!r}")


def resolve_device(setting: Any = "auto") -> torch.device:
    """The torch.device for a ``--device`` setting; a CUDA device that is not there is one
    clear error naming what is."""
    check_device(setting)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = (
                f"this torch {torch.__version__} is built with CUDA {built} but sees no GPU"
                if built
                else f"this torch {torch.__version__} is a CPU-only build"
            )
            raise ValueError(f"--device {setting}: no CUDA device ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {setting}: this machine has {count} CUDA device(s), "
                f"cuda:0..cuda:{count - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_info(device: Any) -> dict[str, Any]:
    """What a run directory records about the device: its name, the GPU, torch and CUDA."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "torch": str(torch.__version__)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=str(torch.version.cuda),
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def configure_device(device: torch.device, deterministic: bool = False) -> str:
    """The CUDA fast path's global switches for a run; returns a line for the log.

    - cudnn.benchmark picks the fastest convolution algorithm for each shape (the shapes of a
      training run repeat, so the search pays), unless ``deterministic``;
    - ``deterministic`` asks torch and cuDNN for bitwise repeatable kernels, and cuBLAS for its
      fixed workspace (``CUBLAS_WORKSPACE_CONFIG``), at some speed.

    The CPU needs none of this: its runs are bitwise repeatable already."""
    if device.type != "cuda":
        return "cpu"
    torch.cuda.set_device(device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
        return f"{device} ({torch.cuda.get_device_name(device)}), deterministic kernels"
    torch.backends.cudnn.benchmark = True
    return f"{device} ({torch.cuda.get_device_name(device)}), cudnn.benchmark"


def check_compile(value: Any) -> None:
    if isinstance(value, bool) or value == "auto":
        return
    raise ValueError(f"compile must be 'auto', true or false, got {value!r}")


def macs_per_image(model: nn.Module, in_chans: int, image_size: tuple[int, int]) -> int:
    """Forward multiply-accumulates of one image (eval mode, so BN statistics stay put)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .. import kernels

    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_chans, *image_size)
        # kernels off: the counter sees aten ops only, not the gate kernels (attnzoo.kernels)
        with torch.no_grad(), kernels.kernels("off"), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def estimated_step_seconds(macs: int, batch_size: int, threads: int) -> float:
    """A low estimate of one CPU training step: 3x the forward MACs of the batch."""
    return 3 * macs * batch_size / (CPU_MACS_PER_SECOND_PER_THREAD * max(threads, 1))


def compile_saving(attention: str | None) -> float:
    """The fraction of a step that compiling saves, as measured for this attention."""
    return COMPILE_SAVING_BY_ATTENTION.get(attention or "", COMPILE_SAVING)


def decide_compile(
    setting: Any, planned_steps: int, step_seconds: float, saving: float = COMPILE_SAVING
) -> tuple[bool, str]:
    """Resolve ``compile`` ('auto', True, False) for a run; returns (compile?, why)."""
    check_compile(setting)
    if setting is not True and setting is not False:
        saved = planned_steps * step_seconds * saving
        if planned_steps < MIN_COMPILED_STEPS:
            return False, f"auto: {planned_steps} steps are too few to repay compiling"
        if saving <= 0:
            return False, "auto: this attention's fused eager gates are faster than compiled"
        if saved < COMPILE_SECONDS:
            return False, (
                f"auto: {planned_steps} steps x ~{step_seconds:.2g} s x {saving:.0%} "
                f"would save ~{saved:.0f} s, less than compiling takes (~{COMPILE_SECONDS:.0f} s)"
            )
        return True, (
            f"auto: {planned_steps} steps x ~{step_seconds:.2g} s x {saving:.0%} "
            f"saves ~{saved:.0f} s, more than compiling takes (~{COMPILE_SECONDS:.0f} s)"
        )
    return setting, "compile on" if setting else "compile off"


def planned_steps(epochs: int, steps_per_epoch: int) -> int:
    return max(0, epochs) * max(0, steps_per_epoch)


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` for training. The caller keeps the uncompiled module for its
    state_dict (the compiled wrapper's keys carry an ``_orig_mod.`` prefix)."""
    return torch.compile(model)
