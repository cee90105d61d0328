"""The CPU gate kernels (``gates.cpp``): built on first use, cached, called through ctypes.

Why this route (measured against the others in docs/performance.md, "Fused gate kernels"):
``gates.cpp`` is plain C++ with OpenMP and no PyTorch headers, so it compiles in about a
second with the system's ``g++`` (a PyTorch C++ extension takes a minute and needs ninja),
and the install command stays ``pip install -e .``. It is compiled with ``-O3
-march=native`` for the machine it runs on; the shared object is cached under
``$ATTNZOO_KERNEL_CACHE`` (default ``~/.cache/attnzoo/kernels``), keyed by the source, the
compiler, the flags and the CPU, and written atomically (a half-written file is never
loaded). With no compiler, or a failed build, ``available()`` is False, ``reason()`` says
why, and the gates take the PyTorch path (``attnzoo.kernels.backend``).

The functions take contiguous ``[O, R, I]`` tensors (``reference.py`` gives the contract)
and pass PyTorch's thread count to the kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("gates.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-std=c++17")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_state: dict[str, object] = {}


def compiler() -> str | None:
    """The C++ compiler used: ``$CXX``, else g++ or c++ on PATH."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("ATTNZOO_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "attnzoo" / "kernels"


def _build() -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++ on PATH, or $CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_key()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"gates-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(f"{Path(cxx).name} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.attnzoo_gate_reduce.argtypes = [
        i32,
        ptr,
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        i32,
    ]
    lib.attnzoo_gate_broadcast.argtypes = [
        i32,
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        i64,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        i32,
    ]
    lib.attnzoo_gate_conv.argtypes = [i32, ptr, ptr, i64, i64, i64, i64, ptr, i64, ptr, i32]
    lib.attnzoo_gate_reduce.restype = lib.attnzoo_gate_broadcast.restype = i32
    lib.attnzoo_gate_conv.restype = i32
    lib.attnzoo_tri_reduce.argtypes = [i32, ptr, ptr, i64, i64, i64, i64] + [ptr] * 9 + [i32, i32]
    lib.attnzoo_tri_broadcast.argtypes = [i32, ptr, i64, i64, i64, i64] + [ptr] * 13 + [i32]
    lib.attnzoo_tri_reduce.restype = lib.attnzoo_tri_broadcast.restype = i32
    _state["path"] = str(target)
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on the first call), or None where they cannot be built."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _build()
                except (OSError, RuntimeError) as error:
                    _state["lib"] = None
                    _state["reason"] = str(error)
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def reason() -> str:
    """Why the kernels are unavailable ('' when they are)."""
    library()
    return str(_state.get("reason", ""))


def describe() -> str:
    """One line for logs and ``attnzoo bench``: which library runs, or why none does."""
    if library() is None:
        return f"PyTorch (no C++ kernels: {reason()})"
    return f"C++ (OpenMP, -march=native; {_state['path']})"


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPES and available()


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("the gate kernels take contiguous tensors")
    return t.data_ptr()


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"attnzoo gate kernel refused its arguments (code {rc})")


def _n(groups: torch.Tensor | None) -> int:
    return 1 if groups is None else groups.shape[0]


def _reduce(a, b, groups, g, want_max):  # noqa: ANN001, ANN202
    o, r, i = a.shape
    total = torch.empty(o, g, i, dtype=torch.float32)
    top = torch.empty(o, g, i, dtype=torch.float32) if want_max else None
    arg = torch.empty(o, g, i, dtype=torch.int32) if want_max else None
    _check(
        library().attnzoo_gate_reduce(
            DTYPES[a.dtype],
            _ptr(a),
            _ptr(b),
            o,
            r,
            i,
            _ptr(groups),
            g,
            _n(groups),
            _ptr(total),
            _ptr(top),
            _ptr(arg),
            torch.get_num_threads(),
        )
    )
    return total, top, arg


def pool(x, groups, g, want_max):  # noqa: ANN001, ANN201
    return _reduce(x, None, groups, g, want_max)


def dot(grad, x, groups, g):  # noqa: ANN001, ANN201
    return _reduce(grad, x, groups, g, False)[0]


def _broadcast(x, gate, groups, g, bias, argmax, dmax, out):  # noqa: ANN001, ANN202
    o, r, i = x.shape
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    _check(
        library().attnzoo_gate_broadcast(
            DTYPES[x.dtype],
            _ptr(x),
            o,
            r,
            i,
            _ptr(groups),
            g,
            _n(groups),
            _ptr(gate),
            _ptr(bias),
            _ptr(argmax),
            _ptr(dmax),
            _ptr(out),
            torch.get_num_threads(),
        )
    )
    return out


def apply(x, gate, groups, g, out=None):  # noqa: ANN001, ANN201
    return _broadcast(x, gate, groups, g, None, None, None, out)


def backward(grad, gate, groups, g, bias=None, argmax=None, dmax=None, out=None):  # noqa: ANN001, ANN201
    return _broadcast(grad, gate, groups, g, bias, argmax, dmax, out)


def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight, padding=k // 2) for x (B, C, H, W) and weight (C, k, k), float32
    and contiguous: (B, H, W)."""
    b, c, h, w = x.shape
    out = torch.empty(b, h, w, dtype=torch.float32)
    _check(
        library().attnzoo_gate_conv(
            0,
            _ptr(x),
            None,
            b,
            c,
            h,
            w,
            _ptr(weight),
            weight.shape[-1],
            _ptr(out),
            torch.get_num_threads(),
        )
    )
    return out


def conv_grad_input(grad: torch.Tensor, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The input gradient of ``conv`` for grad (B, H, W): (B, C, H, W)."""
    b, h, w = grad.shape
    out = torch.empty(b, channels, h, w, dtype=torch.float32)
    _check(
        library().attnzoo_gate_conv(
            1,
            None,
            _ptr(grad),
            b,
            channels,
            h,
            w,
            _ptr(weight),
            weight.shape[-1],
            _ptr(out),
            torch.get_num_threads(),
        )
    )
    return out


def conv_grad_weight(grad: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """The weight gradient of ``conv`` for grad (B, H, W) and the input x: (C, k, k)."""
    b, c, h, w = x.shape
    out = torch.empty(c, k, k, dtype=torch.float32)
    _check(
        library().attnzoo_gate_conv(
            2, _ptr(x), _ptr(grad), b, c, h, w, None, k, _ptr(out), torch.get_num_threads()
        )
    )
    return out


def _tri_shapes(n: int, d1: int, d2: int, d3: int) -> tuple[tuple[int, ...], ...]:
    return (n, d2 * d3), (n, d1 * d3), (n, d1 * d2)


def tri_pool(x: torch.Tensor, which: tuple[bool, bool, bool], want_max: bool):  # noqa: ANN201
    """Triplet's reductions of x [N, D1, D2, D3] (contiguous, memory order) over D1, D2 and
    D3 (those ``which`` asks for), one pass: per branch (sum, max, argmax) as [N, rest]
    float32/int32 tensors, or None."""
    n, d1, d2, d3 = x.shape
    results, pointers = [], []
    for wanted, shape in zip(which, _tri_shapes(n, d1, d2, d3), strict=True):
        if not wanted:
            results.append(None)
            pointers += [None, None, None]
            continue
        total = torch.empty(shape, dtype=torch.float32)
        top = torch.empty(shape, dtype=torch.float32) if want_max else None
        arg = torch.empty(shape, dtype=torch.int32) if want_max else None
        results.append((total, top, arg))
        pointers += [_ptr(total), _ptr(top), _ptr(arg)]
    _check(
        library().attnzoo_tri_reduce(
            DTYPES[x.dtype],
            _ptr(x),
            None,
            n,
            d1,
            d2,
            d3,
            *pointers,
            int(want_max),
            torch.get_num_threads(),
        )
    )
    return results


def tri_dot(grad: torch.Tensor, x: torch.Tensor, which: tuple[bool, bool, bool]):  # noqa: ANN201
    """sum of grad * x over D1, D2, D3 (those asked for), one pass: [N, rest] float32 each."""
    n, d1, d2, d3 = x.shape
    results, pointers = [], []
    for wanted, shape in zip(which, _tri_shapes(n, d1, d2, d3), strict=True):
        total = torch.empty(shape, dtype=torch.float32) if wanted else None
        results.append(total)
        pointers += [_ptr(total), None, None]
    _check(
        library().attnzoo_tri_reduce(
            DTYPES[x.dtype],
            _ptr(grad),
            _ptr(x),
            n,
            d1,
            d2,
            d3,
            *pointers,
            0,
            torch.get_num_threads(),
        )
    )
    return results


def tri_broadcast(x: torch.Tensor, terms, out: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ANN001
    """x * round(sum of the branches' gates) + their bias and max terms; ``terms`` is one
    (gate, bias, argmax, dmax) tuple (entries may be None) or None per branch. x and ``out``
    (optional) are [N, D1, D2, D3] views in memory order (contiguous in that order)."""
    n, d1, d2, d3 = x.shape
    pointers = []
    for term in terms:
        pointers += [None] * 4 if term is None else [_ptr(t) for t in term]
    out = torch.empty(x.shape, dtype=x.dtype) if out is None else out
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor")
    _check(
        library().attnzoo_tri_broadcast(
            DTYPES[x.dtype], _ptr(x), n, d1, d2, d3, *pointers, _ptr(out), torch.get_num_threads()
        )
    )
    return out
