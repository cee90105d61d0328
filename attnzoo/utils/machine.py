"""Which machine a figure came from: the CPU's model name and the flags that decide speed.

Every measurement attnzoo prints (``bench``, ``profile``) and every run's ``summary.json``
carries ``machine_info()``, because the same code runs at very different relative speeds on
different CPUs: bf16 autocast takes 0.6x the fp32 step time on a CPU with AMX, 0.7x on one
with AVX-512 bf16 only, and 11.5x on one without bf16 instructions (docs/performance.md).

The flags come from ``/proc/cpuinfo`` (Linux); elsewhere the list is empty and only torch's
own view (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can
lower) is known.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import torch

# The flags worth naming: the vector widths and the bf16 / matrix units torch's kernels use.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, every flag) of the first CPU in /proc/cpuinfo; ('', {}) if unreadable."""
    model, flags = "", frozenset()
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def has_bf16_instructions() -> bool:
    """True if the CPU computes in bf16 natively: AVX-512 bf16 (Intel Cooper Lake, AMD Zen 4
    and later) or AMX bf16 tiles (Intel Sapphire Rapids and later)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def machine_info() -> dict[str, Any]:
    """The CPU, its speed-relevant flags, torch's kernel level, threads and versions."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "forced_capability": os.environ.get("ATEN_CPU_CAPABILITY") or None,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line, e.g. 'AMD EPYC (avx2 fma avx512f avx512_bf16; ATen AVX512), 2 threads, torch
    2.14.1'."""
    info = info or machine_info()
    flags = " ".join(info.get("cpu_flags") or []) or "flags unknown"
    forced = ", forced by ATEN_CPU_CAPABILITY" if info.get("forced_capability") else ""
    return (
        f"{info.get('cpu') or 'unknown CPU'} ({flags}; ATen {info.get('aten_capability')}"
        f"{forced}), {info.get('threads')} thread{'s' if info.get('threads') != 1 else ''}, "
        f"torch {info.get('torch')}"
    )


def machine_line(settings: dict[str, Any]) -> str:
    """'CPU: ...' for a measurement's printed header, from its settings' ``machine``."""
    info = settings.get("machine")
    return f"CPU: {describe_machine(info)}" if info else "CPU: not recorded"
