"""Fused gate kernels: the gate family of SE, ECA, CBAM, HAM and triplet attention as
kernels that read a feature map once per pass (issue 13; docs/performance.md, "Fused gate
kernels").

- ``reference.py``: the contract of the four operations (``pool``, ``dot``, ``apply``,
  ``backward``) in plain PyTorch, which the kernels are tested against;
- ``gates.cpp`` + ``cpu.py``: the CPU kernels (C++ with OpenMP, built on first use and
  cached; without a compiler the gates take the PyTorch path);
- ``triton_gates.py``: the same operations in Triton for CUDA tensors;
- ``views.py``: a 4-d map as the kernels' ``[O, R, I]`` view.

Which path a gate takes: ``ATTNZOO_KERNELS=auto|on|off`` (default auto), ``set_mode`` or
the ``kernels(mode)`` context. ``auto`` uses the kernels where they are built for the
tensor's device and dtype, ``off`` the PyTorch path (the A/B baseline of ``attnzoo bench
--kernels``), ``on`` is auto that fails loudly where the kernels cannot be built or loaded
(other dtypes, float64 say, take the PyTorch path in every mode).
``layers.plain_gates()`` still selects the plain autograd expression over both.
``describe(device)`` names the path for logs and benchmark tables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import cpu

MODES = ("auto", "on", "off")
_mode: list[str] = []


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def mode() -> str:
    if _mode:
        return _mode[-1]
    value = os.environ.get("ATTNZOO_KERNELS", "auto")
    if value not in MODES:
        raise ValueError(f"ATTNZOO_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


def set_mode(value: str) -> None:
    """Set the mode for the rest of the process (``kernels`` for a scope)."""
    _mode[:] = [_check_mode(value)]


@contextlib.contextmanager
def kernels(value: str) -> Iterator[None]:
    _mode.append(_check_mode(value))
    try:
        yield
    finally:
        _mode.pop()


def _triton():  # noqa: ANN202
    from . import triton_gates

    return triton_gates


def _triton_ready(device: torch.device) -> bool:
    try:
        return _triton().available(device)
    except ImportError:
        return False


def backend(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """'cpp', 'triton' or 'pytorch': the path gates on ``device`` take in the current mode."""
    device = torch.device(device)
    if mode() == "off":
        return "pytorch"
    if device.type == "cpu":
        ready = cpu.available()
        if ready and dtype in cpu.DTYPES:
            return "cpp"
    elif device.type == "cuda":
        ready = _triton_ready(device)
        if ready and dtype in (torch.float32, torch.bfloat16, torch.float16):
            return "triton"
    else:
        ready = True  # no kernels for this device type: the PyTorch path by design
    if mode() == "on" and not ready:
        why = cpu.reason() if device.type == "cpu" else "Triton is not available"
        raise RuntimeError(
            f"ATTNZOO_KERNELS=on but the gate kernels cannot run on {device} ({why}); "
            f"use auto to fall back to the PyTorch path"
        )
    return "pytorch"  # float64 and float16 on the CPU: no kernels, by design


def describe(device: torch.device | str) -> str:
    """One line: the gate path on ``device`` (for run logs and ``attnzoo bench``)."""
    device = torch.device(device)
    if mode() == "off":
        return "PyTorch (kernels off)"
    if device.type == "cpu":
        return cpu.describe()
    return "Triton" if _triton_ready(device) else "PyTorch (Triton not available)"


def enabled(x: torch.Tensor) -> bool:
    """Whether gates on x take a kernel."""
    return backend(x.device, x.dtype) != "pytorch"


def _impl(x: torch.Tensor):  # noqa: ANN202
    return cpu if x.device.type == "cpu" else _triton()


def pool(x, groups, g, want_max):  # noqa: ANN001, ANN201
    return _impl(x).pool(x, groups, g, want_max)


def dot(grad, x, groups, g):  # noqa: ANN001, ANN201
    return _impl(x).dot(grad, x, groups, g)


def apply(x, gate, groups, g, out=None):  # noqa: ANN001, ANN201
    """``out`` (optional): a contiguous tensor like x to write into."""
    return _impl(x).apply(x, gate, groups, g, out=out)


def backward(grad, gate, groups, g, bias=None, argmax=None, dmax=None, out=None):  # noqa: ANN001, ANN201
    return _impl(grad).backward(grad, gate, groups, g, bias, argmax, dmax, out=out)
