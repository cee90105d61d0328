"""Cases comparing ``attnzoo.kernels.triton_gates`` with ``attnzoo.kernels.reference``.

Each case is a function of a device name that raises AssertionError on a mismatch. Run as a
script, it executes the named cases (all without arguments) and prints one JSON object,
``{case: null | "error text"}``, as its last line; ``test_triton_gates.py`` runs it in a
subprocess with ``TRITON_INTERPRET=1`` on CPU tensors (the interpreter must be chosen before
triton is imported), and calls the cases in-process on CUDA tensors where a GPU is present.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

import torch

from attnzoo.kernels import reference as ref
from attnzoo.kernels import triton_gates as tg

CASES: dict[str, Callable[[str], None]] = {}

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (O, R, I): R = 1 and I = 1 edges, odd sizes (no R*I a multiple of a block), both tilings
# (I < 16 flat columns, I >= 16 one o per column block with a partial last block of i).
SHAPES = [(1, 1, 1), (3, 7, 1), (2, 7, 3), (5, 33, 1), (1, 130, 1), (2, 9, 20), (2, 5, 16)]
# Forced (BLOCK_R, BLOCK_C, FLAT) tilings: several row blocks, so maxima merge across them.
TILINGS = [(2, 1, True), (4, 4, True), (2, 16, False), (4, 32, False)]


def case(fn: Callable[[str], None]) -> Callable[[str], None]:
    CASES[fn.__name__] = fn
    return fn


def randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def make_groups(o: int, r: int, n: int, g: int, device: str, seed: int) -> torch.Tensor:
    """int8 [n, r] ids in 0..g-1; sample 0 puts every row in group 0 (the others are empty)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, g, (n, r), generator=gen, dtype=torch.int8)
    groups[0] = 0
    assert o % n == 0
    return groups.to(device)


def sums64(v: torch.Tensor, groups: torch.Tensor | None, g: int) -> tuple[torch.Tensor, ...]:
    """Per-group sums of v and of |v| in float64, [O, G, I] each."""
    o, r, _ = v.shape
    index = ref._group_index(groups, o, r)
    v = v.double()
    sums, sizes = [], []
    for group in range(g):
        member = torch.ones(o, r, 1, dtype=torch.bool, device=v.device)
        if index is not None:
            member = (index == group)[:, :, None]
        sums.append(torch.where(member, v, 0).sum(1))
        sizes.append(torch.where(member, v.abs(), 0).sum(1))
    return torch.stack(sums, 1), torch.stack(sizes, 1)


def check_sums(got: torch.Tensor, v: torch.Tensor, groups: torch.Tensor | None, g: int) -> None:
    want, size = sums64(v, groups, g)
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape)
    error = (got.double() - want).abs()
    same = (got.double() == want) | (got.isnan() & want.isnan())  # infinities too
    bad = ~same & ~(error <= 1e-5 * size + 1e-6)
    assert not bad.any(), f"sums differ at {bad.nonzero()[:5].tolist()}: {error[bad][:5]}"


def check_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    same = (got == want) | (got.isnan() & want.isnan()) if got.is_floating_point() else got == want
    assert same.all(), (
        f"{what} differ at {(~same).nonzero()[:5].tolist()}: {got[~same][:5]} vs {want[~same][:5]}"
    )


def check_ulps(got: torch.Tensor, want: torch.Tensor, what: str, ulps: int = 1) -> None:
    """Equal to within ``ulps`` units in the last place of want's dtype (NaN matches NaN)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape)
    eps = torch.finfo(want.dtype).eps
    g, w = got.double(), want.double()
    scale = torch.maximum(g.abs(), w.abs())
    near = (g - w).abs() <= ulps * eps * scale + torch.finfo(want.dtype).tiny * eps
    same = (g == w) | (g.isnan() & w.isnan()) | near
    assert same.all(), (
        f"{what} differ at {(~same).nonzero()[:5].tolist()}: {got[~same][:5]} vs {want[~same][:5]}"
    )


def check_pool(
    x: torch.Tensor,
    groups: torch.Tensor | None,
    g: int,
    tiling: tuple[int, int, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel pool (with max) vs the reference: sums to float64 tolerance, max/argmax exact."""
    if tiling is None:
        sums, maxes, args = tg.pool(x, groups, g, True)
    else:
        rows = 1 if groups is None else x.shape[0] // groups.shape[0]
        sums, maxes, args = tg._pool(x, None, groups, g, True, rows, tiling)
    _, want_max, want_arg = ref.pool(x, groups, g, True)
    check_sums(sums, x, groups, g)
    check_exact(maxes, want_max, "max")
    check_exact(args, want_arg, "argmax")
    return sums, maxes, args


@case
def pool_shapes(device: str) -> None:
    for k, shape in enumerate(SHAPES):
        for dtype in (F32, BF16):
            check_pool(randn(shape, dtype, device, k), None, 1)
    x = randn((3, 7, 1), F16, device, 99)
    check_pool(x, None, 1)
    sums, maxes, args = tg.pool(x, None, 1, False)
    assert maxes is None and args is None
    check_sums(sums, x, None, 1)


@case
def pool_groups(device: str) -> None:
    for k, (o, r, i) in enumerate([(2, 7, 1), (4, 7, 3), (4, 9, 20), (6, 1, 1)]):
        groups = make_groups(o, r, 2, 2, device, k)
        for dtype in (F32, BF16):
            x = randn((o, r, i), dtype, device, 10 + k)
            sums, maxes, args = check_pool(x, groups, 2)
            half = o // 2  # sample 0 (rows o < half) has an empty group 1
            assert (sums[:half, 1] == 0).all() and (args[:half, 1] == -1).all()
            assert (maxes[:half, 1] == float("-inf")).all()


@case
def pool_tilings(device: str) -> None:
    for k, tiling in enumerate(TILINGS):
        for o, r, i in [(4, 7, 3), (2, 9, 20)]:
            x = randn((o, r, i), F32, device, 20 + k)
            check_pool(x, None, 1, tiling)
            check_pool(x, make_groups(o, r, 2, 2, device, k), 2, tiling)


@case
def pool_ties(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for tiling in [None, *TILINGS]:
        for o, r, i in [(4, 7, 3), (2, 9, 20)]:
            x = torch.randint(0, 2, (o, r, i), generator=gen).float()
            x[:, :, 0] = 1.0  # all equal: the first row wins
            x[0, :, :] = float("-inf")  # all -inf: the max is -inf at the first member
            x = x.to(device)
            _, maxes, args = check_pool(x, None, 1, tiling)
            assert (args[:, 0, 0] == 0).all()
            assert (maxes[0] == float("-inf")).all() and (args[0] == 0).all()
            groups = make_groups(o, r, 2, 2, device, 5)
            _, _, args = check_pool(x, groups, 2, tiling)
            first1 = groups[1].tolist().index(1) if 1 in groups[1].tolist() else -1
            assert (args[o // 2 :, 1, 0] == first1).all()


@case
def pool_nan(device: str) -> None:
    for tiling in [None, *TILINGS]:
        for o, r, i in [(4, 7, 3), (2, 9, 20)]:
            x = randn((o, r, i), F32, device, 30)
            x[0, 3, 0] = float("nan")  # one NaN: the max, at r = 3
            x[0, 1, 1] = float("nan")  # two NaNs in one column: the first
            x[0, 6, 1] = float("nan")
            x[1, r - 1, 0] = float("nan")  # a NaN after a +inf
            x[1, 0, 0] = float("inf")
            x[1, 2, 2] = float("inf")  # +inf, no NaN
            groups = make_groups(o, r, 2, 2, device, 6)
            for xx in [x, x.bfloat16()] if tiling is None else [x]:
                _, maxes, args = check_pool(xx, None, 1, tiling)
                assert maxes[0, 0, 0].isnan() and args[0, 0, 0] == 3 and args[0, 0, 1] == 1
                assert maxes[1, 0, 0].isnan() and args[1, 0, 0] == r - 1
                assert maxes[1, 0, 2] == float("inf") and args[1, 0, 2] == 2
                check_pool(xx, groups, 2, tiling)


@case
def dot_cases(device: str) -> None:
    for k, (o, r, i) in enumerate([(1, 1, 1), (4, 7, 1), (4, 7, 3), (2, 33, 20)]):
        for dtype in (F32, BF16):
            grad = randn((o, r, i), dtype, device, 40 + k)
            x = randn((o, r, i), dtype, device, 50 + k)
            product = grad.double() * x.double()
            check_sums(tg.dot(grad, x, None, 1), product, None, 1)
            groups = make_groups(o, r, 1 if o == 1 else 2, 2, device, k)
            check_sums(tg.dot(grad, x, groups, 2), product, groups, 2)
            assert torch.allclose(
                tg.dot(grad, x, groups, 2), ref.dot(grad, x, groups, 2), 1e-5, 1e-5
            )
    grad, x = randn((4, 7, 3), BF16, device, 60), randn((4, 7, 3), F32, device, 61)
    check_sums(tg.dot(grad, x, None, 1), grad.double() * x.double(), None, 1)


@case
def apply_cases(device: str) -> None:
    for k, (o, r, i) in enumerate(SHAPES):
        for dtype in (F32, BF16, F16):
            x = randn((o, r, i), dtype, device, 70 + k)
            gate = torch.rand(o, 1, i, generator=torch.Generator().manual_seed(k)).to(device)
            check_exact(tg.apply(x, gate, None, 1), ref.apply(x, gate, None, 1), "apply")
            if o % 2 == 0:
                groups = make_groups(o, r, 2, 2, device, k)
                gate2 = torch.rand(o, 2, i, generator=torch.Generator().manual_seed(k)).to(device)
                check_exact(tg.apply(x, gate2, groups, 2), ref.apply(x, gate2, groups, 2), "apply")
    x = randn((4, 9, 20), BF16, device, 79)
    gate = torch.rand(4, 2, 20, generator=torch.Generator().manual_seed(9)).to(device)
    groups = make_groups(4, 9, 2, 2, device, 9)
    for tiling in TILINGS:
        got = tg._gate(x, gate, groups, 2, 2, False, tiling=tiling)
        check_exact(got, ref.apply(x, gate, groups, 2), f"apply {tiling}")


@case
def backward_cases(device: str) -> None:
    def rand(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)

    for k, (o, r, i) in enumerate([(1, 1, 1), (4, 7, 1), (4, 7, 3), (2, 33, 20), (2, 9, 16)]):
        n = 1 if o == 1 else 2
        for dtype in (F32, BF16, F16) if i == 3 else (F32, BF16):
            grad = randn((o, r, i), dtype, device, 80 + k)
            x = randn((o, r, i), dtype, device, 90 + k)
            for groups, g in [(None, 1), (make_groups(o, r, n, 2, device, k), 2)]:
                gate, bias, dmax = (
                    rand((o, g, i), k),
                    rand((o, g, i), k + 1),
                    rand((o, g, i), k + 2),
                )
                _, _, argmax = ref.pool(x, groups, g, True)  # -1 in an empty group
                for extra in [
                    (),
                    (bias,),
                    (bias, argmax, dmax),
                    (None, argmax, dmax),
                    (bias, argmax),
                ]:
                    got = tg.backward(grad, gate, groups, g, *extra)
                    want = ref.backward(grad, gate, groups, g, *extra)
                    check_ulps(got, want, f"backward {dtype} {(o, r, i)} g={g} {len(extra)}")
    grad = randn((4, 9, 20), BF16, device, 99)
    gate, bias, dmax = rand((4, 2, 20), 1), rand((4, 2, 20), 2), rand((4, 2, 20), 3)
    groups = make_groups(4, 9, 2, 2, device, 9)
    _, _, argmax = ref.pool(randn((4, 9, 20), F32, device, 98), groups, 2, True)
    want = ref.backward(grad, gate, groups, 2, bias, argmax, dmax)
    for tiling in TILINGS:
        got = tg._gate(grad, gate, groups, 2, 2, True, bias, argmax, dmax, tiling=tiling)
        check_ulps(got, want, f"backward {tiling}")


@case
def empty_extents(device: str) -> None:
    x = torch.zeros(3, 0, 2, device=device)
    sums, maxes, args = tg.pool(x, None, 1, True)
    assert sums.shape == (3, 1, 2) and (sums == 0).all()
    assert (maxes == float("-inf")).all() and (args == -1).all()
    groups = torch.zeros(3, 0, dtype=torch.int8, device=device)
    sums, maxes, args = tg.pool(x, groups, 2, True)
    assert sums.shape == (3, 2, 2) and (sums == 0).all() and (args == -1).all()
    assert tg.pool(torch.zeros(0, 4, 2, device=device), None, 1, True)[0].shape == (0, 1, 2)
    assert tg.apply(x, torch.ones(3, 1, 2, device=device), None, 1).shape == (3, 0, 2)


def main(names: list[str]) -> int:
    results: dict[str, str | None] = {}
    for name in names or list(CASES):
        try:
            CASES[name]("cpu")
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
