"""Triton kernels for the gate family (SE, ECA, CBAM, HAM, triplet): ``pool``, ``dot``,
``apply`` and ``backward`` on a contiguous ``[O, R, I]`` view of a feature map.

The contract (signatures, grouping, dtypes, ties, NaN and empty groups) is
``attnzoo.kernels.reference``'s; these functions compute the same results on CUDA tensors,
or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first
kernel is built). Sums accumulate in float32 in a different order from PyTorch's, so they
agree to rounding; max, argmax and ``apply`` agree exactly, ``backward`` to one rounding of
its float32 sum (a GPU may fuse ``grad * gate + bias`` into one FMA).

Triton is imported lazily: this module imports without it, and ``available()`` says whether
the kernels can run (for a device: CUDA tensors, or CPU tensors when interpreted).

Tiling. A *column* is one (o, i); a program owns a block of ``BLOCK_C`` columns and works
on ``[BLOCK_R, BLOCK_C]`` tiles (``x[o, r, i]`` at ``(o * R + r) * I + i``):

- ``FLAT`` (I small, e.g. I = 1): columns are consecutive flat (o, i) indices, so a block
  spans several o and each column's rows are contiguous (I = 1) or strided by I;
- otherwise a block is one o and ``BLOCK_C`` consecutive i, so a tile's rows are contiguous
  vectors along i and the reduction runs across rows.

``pool``/``dot`` loop over R in ``BLOCK_R`` steps, one program per column block, holding
``[BLOCK_C, G]`` accumulators (the group axis is a third tile dim of size ``next_pow2(G)``,
so x is read once for all groups). The max keeps its first index: per tile, the max of the
non-NaN members, then the least r equal to it (or the least NaN r when the tile has a NaN);
a tile replaces the running max only when it is greater (or the running max has no member
yet), or when it has the group's first NaN. ``apply``/``backward`` are elementwise: one
program per (column block, row block) tile, the gate gathered per element by its group.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

tl: Any = None  # triton.language, bound by _kernels()

__all__ = ["available", "pool", "dot", "apply", "backward"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NO_INDEX = 2**31 - 1  # the running argmax before any member: larger than every r
_MAX_EXTENT = 2**30  # O*I and R, kept well inside int32 index arithmetic


@functools.cache
def _triton() -> Any:
    """The ``triton`` module, or None where it does not import."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return None
    return triton


def available(device: torch.device | str | None = None) -> bool:
    """Whether Triton imports and, given a device, whether these kernels can run there:
    a CUDA device that torch can use, or the CPU under Triton's interpreter
    (``TRITON_INTERPRET=1``)."""
    if _triton() is None:
        return False
    if device is None:
        return True
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


@functools.cache
def _kernels() -> Any:
    """Build the kernels on first use (so the interpreter setting is read then, not at import).

    The names are module globals, not closures: the interpreter re-executes each kernel's
    source against its module's globals, where ``tl`` and the helper must be found."""
    global tl, _NO_INDEX_TL, _columns, _widen, _narrow
    import triton
    import triton.language as tl

    _NO_INDEX_TL = tl.constexpr(_NO_INDEX)

    # Triton's interpreter (3.8) truncates float32 -> bfloat16 where a GPU rounds to nearest
    # even, so interpreted kernels (EMULATE_BF16) convert bfloat16 by bit arithmetic instead.
    @triton.jit
    def _widen(v, EMULATE_BF16: tl.constexpr):
        """v as float32 (exact)."""
        if EMULATE_BF16:
            if v.dtype == tl.bfloat16:
                bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                return (bits << 16).to(tl.float32, bitcast=True)
        return v.to(tl.float32)

    @triton.jit
    def _narrow(v, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """float32 v rounded to DTYPE, to nearest even (a NaN stays NaN)."""
        if EMULATE_BF16:
            if DTYPE == tl.bfloat16:
                bits = v.to(tl.int32, bitcast=True)
                size = bits & 0x7FFFFFFF
                up = (size + 0x7FFF + ((size >> 16) & 1)) >> 16
                up = tl.where(size > 0x7F800000, 0x7FC0, up)  # NaN
                return (up | ((bits >> 16) & 0x8000)).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return v.to(DTYPE)

    @triton.jit
    def _columns(block, O, I, BLOCK_C: tl.constexpr, FLAT: tl.constexpr):
        """Column block ``block`` -> (o, i, valid), each ``[BLOCK_C]`` (int32, int32, bool)."""
        if FLAT:
            c = block * BLOCK_C + tl.arange(0, BLOCK_C)
            o = c // I
            i = c - o * I
            valid = o < O
        else:
            blocks_i = tl.cdiv(I, BLOCK_C)
            o = tl.zeros([BLOCK_C], tl.int32) + block // blocks_i
            i = (block % blocks_i) * BLOCK_C + tl.arange(0, BLOCK_C)
            valid = i < I
        return o, i, valid

    @triton.jit
    def pool_kernel(
        x_ptr,
        y_ptr,
        groups_ptr,
        sum_ptr,
        max_ptr,
        arg_ptr,
        O,
        R,
        I,
        rows_per_sample,
        G: tl.constexpr,
        GP: tl.constexpr,
        HAS_Y: tl.constexpr,
        HAS_GROUPS: tl.constexpr,
        WANT_MAX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        FLAT: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        o, i, valid = _columns(tl.program_id(0), O, I, BLOCK_C, FLAT)
        base = o.to(tl.int64) * R * I + i  # [C]: offset of (o, 0, i)
        group = tl.arange(0, GP)  # [GP]
        if HAS_GROUPS:
            group_row = (o // rows_per_sample).to(tl.int64) * R  # [C]: the sample's groups row
        acc = tl.zeros([BLOCK_C, GP], tl.float32)
        if WANT_MAX:
            best = tl.full([BLOCK_C, GP], float("-inf"), tl.float32)
            best_r = tl.full([BLOCK_C, GP], _NO_INDEX_TL, tl.int32)
        for start in range(0, R, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)  # [R]
            mask = (r < R)[:, None] & valid[None, :]  # [R, C]
            offsets = base[None, :] + r[:, None].to(tl.int64) * I
            v = _widen(tl.load(x_ptr + offsets, mask=mask, other=0.0), EMULATE_BF16)
            if HAS_Y:
                v = v * _widen(tl.load(y_ptr + offsets, mask=mask, other=0.0), EMULATE_BF16)
            if HAS_GROUPS:
                gid = tl.load(groups_ptr + group_row[None, :] + r[:, None], mask=mask, other=-1)
                member = gid.to(tl.int32)[:, :, None] == group[None, None, :]  # [R, C, GP]
            else:
                member = mask[:, :, None] & (group[None, None, :] == 0)
            v3 = v[:, :, None]
            block_sum = tl.sum(tl.where(member, v3, 0.0), axis=0)  # [C, GP]
            acc += block_sum
            if WANT_MAX:
                is_nan = member & (v3 != v3)
                number = member & (v3 == v3)
                block_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
                block_max = tl.max(tl.where(number, v3, float("-inf")), axis=0)
                hit = tl.where(
                    block_nan[None, :, :], is_nan, number & (v3 == block_max[None, :, :])
                )
                r3 = r[:, None, None] + tl.zeros([BLOCK_R, BLOCK_C, GP], tl.int32)
                block_r = tl.min(tl.where(hit, r3, _NO_INDEX_TL), axis=0)
                # A NaN in the block makes its sum NaN: that is the NaN max.
                block_val = tl.where(block_nan, block_sum, block_max)
                take = (best == best) & (
                    block_nan | (block_max > best) | ((block_max == best) & (block_r < best_r))
                )
                best = tl.where(take, block_val, best)
                best_r = tl.where(take, block_r, best_r)
        out = (o.to(tl.int64)[:, None] * G + group[None, :]) * I + i[:, None]  # [C, GP]
        out_mask = valid[:, None] & (group[None, :] < G)
        tl.store(sum_ptr + out, acc, mask=out_mask)
        if WANT_MAX:
            tl.store(max_ptr + out, best, mask=out_mask)
            tl.store(arg_ptr + out, tl.where(best_r == _NO_INDEX_TL, -1, best_r), mask=out_mask)

    @triton.jit
    def gate_kernel(
        x_ptr,
        gate_ptr,
        groups_ptr,
        bias_ptr,
        arg_ptr,
        dmax_ptr,
        out_ptr,
        O,
        R,
        I,
        rows_per_sample,
        blocks_r,
        G: tl.constexpr,
        HAS_GROUPS: tl.constexpr,
        BACKWARD: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_MAX: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        FLAT: tl.constexpr,
        EMULATE_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        o, i, valid = _columns(pid // blocks_r, O, I, BLOCK_C, FLAT)
        r = (pid % blocks_r) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r < R)[:, None] & valid[None, :]  # [R, C]
        offsets = o.to(tl.int64)[None, :] * R * I + r[:, None].to(tl.int64) * I + i[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if HAS_GROUPS:
            group_row = (o // rows_per_sample).to(tl.int64) * R
            gid = tl.load(groups_ptr + group_row[None, :] + r[:, None], mask=mask, other=0)
            gid = gid.to(tl.int32)
            member = mask & (gid >= 0) & (gid < G)  # an id out of 0..G-1 reads no gate
            per = (o.to(tl.int64)[None, :] * G + gid) * I + i[None, :]  # [R, C]: (o, g(r), i)
        else:
            member = valid[None, :]
            per = (o.to(tl.int64) * I + i)[None, :]  # [1, C]: G = 1
        gate = tl.load(gate_ptr + per, mask=member, other=0.0)
        # The gate rounded to x's dtype; the product of two such values is exact in float32,
        # so one rounding of it equals PyTorch's ``x * gate.to(x.dtype)``.
        dtype = x_ptr.dtype.element_ty
        gate = _widen(_narrow(gate, dtype, EMULATE_BF16), EMULATE_BF16)
        out = _widen(x, EMULATE_BF16) * gate
        if BACKWARD:
            if HAS_BIAS:
                out = out + tl.load(bias_ptr + per, mask=member, other=0.0)
            if HAS_MAX:
                top = tl.load(arg_ptr + per, mask=member, other=-1)
                dmax = tl.load(dmax_ptr + per, mask=member, other=0.0)
                out = out + tl.where(top == r[:, None], dmax, 0.0)
        tl.store(out_ptr + offsets, _narrow(out, dtype, EMULATE_BF16), mask=mask)

    return pool_kernel, gate_kernel, bool(triton.knobs.runtime.interpret)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tiling(o: int, r: int, i: int, reduce: bool) -> tuple[int, int, bool]:
    """(BLOCK_R, BLOCK_C, FLAT) for an [O, R, I] view. Tiles hold ~2K elements; a reduction
    narrows its column block (down to 1 flat column, or 16 i) while that leaves fewer than
    ~512 programs, since each program loops over all of R."""
    tile = 2048
    flat = i < 16
    if flat:
        block_r = min(_pow2(r), 64)
        block_c = max(1, min(_pow2(o * i), tile // block_r))
        floor = 1
    else:
        block_c = min(_pow2(i), 128)
        block_r = max(1, min(_pow2(r), tile // block_c))
        floor = 16
    if reduce:
        while block_c > floor and _blocks(o, i, block_c, flat) < 512:
            block_c //= 2
    return block_r, block_c, flat


def _blocks(o: int, i: int, block_c: int, flat: bool) -> int:
    """The number of column blocks."""
    return -(-o * i // block_c) if flat else o * -(-i // block_c)


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


def _check_ori(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, not {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-d [O, R, I], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_common(
    x: torch.Tensor, groups: torch.Tensor | None, g: int, tensors: dict[str, torch.Tensor]
) -> int:
    """Validate groups and g for x's [O, R, I]; return the rows per sample (1 without groups)."""
    o, r, i = x.shape
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"g must be a positive int, got {g!r}")
    if o * i > _MAX_EXTENT or r > _MAX_EXTENT:
        raise ValueError(f"shape {tuple(x.shape)} is too large (O*I and R at most 2**30)")
    rows_per_sample = 1
    if groups is None:
        if g != 1:
            raise ValueError(f"without groups g must be 1, got {g}")
    else:
        if not isinstance(groups, torch.Tensor) or groups.dtype != torch.int8:
            raise ValueError("groups must be an int8 tensor [N, R]")
        if groups.dim() != 2 or groups.shape[1] != r or groups.shape[0] < 1:
            raise ValueError(f"groups must be [N, R] with R = {r}, got {tuple(groups.shape)}")
        if not groups.is_contiguous():
            raise ValueError("groups must be contiguous")
        if g > 127:
            raise ValueError(f"g must be at most 127 (int8 group ids), got {g}")
        if o % groups.shape[0]:
            raise ValueError(f"O = {o} is not a multiple of the {groups.shape[0]} samples")
        rows_per_sample = max(1, o // groups.shape[0])
        tensors = {**tensors, "groups": groups}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if not available(x.device):
        raise RuntimeError(
            f"the Triton gate kernels cannot run on {x.device}: "
            + (
                "triton is not installed"
                if _triton() is None
                else "they need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1"
            )
        )
    return rows_per_sample


def _check_per_group(
    name: str, t: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, not {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be [O, G, I] = {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _pool(
    x: torch.Tensor,
    y: torch.Tensor | None,
    groups: torch.Tensor | None,
    g: int,
    want_max: bool,
    rows_per_sample: int,
    tiling: tuple[int, int, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    o, r, i = x.shape
    sums = torch.empty(o, g, i, dtype=torch.float32, device=x.device)
    maxes = torch.empty_like(sums) if want_max else None
    args = torch.empty(o, g, i, dtype=torch.int32, device=x.device) if want_max else None
    if sums.numel() == 0:
        return sums, maxes, args
    block_r, block_c, flat = tiling or _tiling(o, r, i, reduce=True)
    blocks = _blocks(o, i, block_c, flat)
    gp = _pow2(g)
    pool_kernel, _, interpreted = _kernels()
    pool_kernel[(blocks,)](
        x,
        x if y is None else y,
        x if groups is None else groups,
        sums,
        sums if maxes is None else maxes,
        sums if args is None else args,
        o,
        r,
        i,
        rows_per_sample,
        G=g,
        GP=gp,
        HAS_Y=y is not None,
        HAS_GROUPS=groups is not None,
        WANT_MAX=bool(want_max),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        FLAT=flat,
        EMULATE_BF16=interpreted,
        num_warps=_warps(block_r * block_c * gp),
    )
    return sums, maxes, args


def _gate(
    x: torch.Tensor,
    gate: torch.Tensor,
    groups: torch.Tensor | None,
    g: int,
    rows_per_sample: int,
    backward: bool,
    bias: torch.Tensor | None = None,
    argmax: torch.Tensor | None = None,
    dmax: torch.Tensor | None = None,
    tiling: tuple[int, int, bool] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    o, r, i = x.shape
    out = torch.empty_like(x) if out is None else _check_out(out, x)
    if out.numel() == 0:
        return out
    block_r, block_c, flat = tiling or _tiling(o, r, i, reduce=False)
    blocks_c = _blocks(o, i, block_c, flat)
    blocks_r = -(-r // block_r)
    _, gate_kernel, interpreted = _kernels()
    has_max = argmax is not None and dmax is not None
    gate_kernel[(blocks_c * blocks_r,)](
        x,
        gate,
        gate if groups is None else groups,
        gate if bias is None else bias,
        gate if not has_max else argmax,
        gate if not has_max else dmax,
        out,
        o,
        r,
        i,
        rows_per_sample,
        blocks_r,
        G=g,
        HAS_GROUPS=groups is not None,
        BACKWARD=backward,
        HAS_BIAS=bias is not None,
        HAS_MAX=has_max,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        FLAT=flat,
        EMULATE_BF16=interpreted,
        num_warps=_warps(block_r * block_c),
    )
    return out


def pool(
    x: torch.Tensor, groups: torch.Tensor | None, g: int, want_max: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per (o, group, i): the float32 sum of x over the group's rows r and, with
    ``want_max``, the float32 max and its int32 argmax (see ``reference.pool``)."""
    _check_ori("x", x)
    rows_per_sample = _check_common(x, groups, g, {})
    return _pool(x, None, groups, g, want_max, rows_per_sample)


def dot(grad: torch.Tensor, x: torch.Tensor, groups: torch.Tensor | None, g: int) -> torch.Tensor:
    """Per (o, group, i): the float32 sum of ``grad * x`` over the group's rows."""
    _check_ori("grad", grad)
    _check_ori("x", x)
    if grad.shape != x.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and x {tuple(x.shape)} differ in shape")
    rows_per_sample = _check_common(x, groups, g, {"grad": grad})
    return _pool(grad, x, groups, g, False, rows_per_sample)[0]


def _check_out(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    return out


def apply(
    x: torch.Tensor,
    gate: torch.Tensor,
    groups: torch.Tensor | None,
    g: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x * gate[o, g(r), i]``, the gate rounded to x's dtype first; x's dtype (written into
    ``out`` when given)."""
    _check_ori("x", x)
    o, _, i = x.shape
    _check_per_group("gate", gate, (o, g, i), torch.float32)
    rows_per_sample = _check_common(x, groups, g, {"gate": gate})
    return _gate(x, gate, groups, g, rows_per_sample, backward=False, out=out)


def backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    groups: torch.Tensor | None,
    g: int,
    bias: torch.Tensor | None = None,
    argmax: torch.Tensor | None = None,
    dmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad * gate + bias + [r == argmax] * dmax`` per element in float32 (the gate rounded
    to grad's dtype first), rounded once to grad's dtype. As in the reference, the argmax
    term is added only when both ``argmax`` and ``dmax`` are given."""
    _check_ori("grad", grad)
    o, _, i = grad.shape
    shape = (o, g, i)
    _check_per_group("gate", gate, shape, torch.float32)
    others = {"gate": gate}
    if bias is not None:
        _check_per_group("bias", bias, shape, torch.float32)
        others["bias"] = bias
    if argmax is not None:
        _check_per_group("argmax", argmax, shape, torch.int32)
        others["argmax"] = argmax
    if dmax is not None:
        _check_per_group("dmax", dmax, shape, torch.float32)
        others["dmax"] = dmax
    rows_per_sample = _check_common(grad, groups, g, others)
    return _gate(grad, gate, groups, g, rows_per_sample, True, bias, argmax, dmax, out=out)
