"""The C++ gate kernels (``attnzoo/kernels/gates.cpp`` through ``kernels/cpu.py``) against
their contract, ``kernels/reference.py``, evaluated in float64 on the same inputs.

What is checked, per dtype (float32, bfloat16), shape and grouping:

- ``pool``: sums within float32 summation error, max values and argmaxes exactly equal;
- ``dot``: within float32 summation error;
- ``apply``: bitwise equal to the reference on the same-dtype inputs (the gate is rounded to
  x's dtype first, one product, one rounding);
- ``backward`` (every combination of bias and max term): float32 within 1e-6 of the
  magnitude of the terms; bfloat16 within one bf16 ulp of the float64 result rounded once.

Plus max ties (lowest index), NaN (the first NaN), all -inf (the first member), empty
groups (sum 0, max -inf, argmax -1), equal results for 1 and 2 threads, the fallback without
a compiler, the build into an empty cache, and the mode switch's validation.
"""

from __future__ import annotations

import pytest
import torch

from attnzoo import kernels
from attnzoo.kernels import cpu, reference

if not cpu.available():
    pytest.skip(f"C++ gate kernels not available: {cpu.reason()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["f32", "bf16"]

# (O, R, I, N): I = 1 (reduced in blocks of 16 consecutive rows o of one sample) and I > 1;
# R = 1; odd sizes; R = 37; O = 34 with N = 2: per sample one full block and a remainder of
# 1; O = 64 with N = 2: two full blocks per sample.
SHAPES = [
    (1, 1, 1, 1),
    (6, 7, 1, 2),
    (6, 37, 1, 3),
    (34, 5, 1, 2),
    (64, 3, 1, 2),
    (4, 5, 3, 2),
    (4, 5, 19, 1),
    (2, 1024, 16, 2),
]
SHAPE_IDS = [f"O{o}-R{r}-I{i}-N{n}" for o, r, i, n in SHAPES]

# None: no table (G = 1, the module gates); "gK": a random int8 table with ids in [0, K);
# "g2-empty": G = 2 with sample 0's group 1 empty; "g3": the generic (lookup) path for G > 2.
GROUPINGS = ["none", "g1", "g2", "g2-empty", "g3"]

# Sums in float32 of R values: |error| <= SUM_RTOL * R * max|term| (worst measured: 4% of
# this bound for pool, 4% for dot).
SUM_RTOL = 1e-6
# backward in float32: |error| <= BACKWARD_RTOL * (|grad * gate| + |bias| + |dmax|) per element
# (worst measured: 9% of it); in bf16 the measured results equal the float64 value rounded once.
BACKWARD_RTOL = 1e-6


def make_groups(grouping: str, n: int, r: int, generator: torch.Generator):
    """(groups int8 [N, R] or None, G)."""
    if grouping == "none":
        return None, 1
    g = int(grouping[1])
    groups = torch.randint(0, g, (n, r), generator=generator).to(torch.int8)
    if grouping == "g2-empty":
        groups[0] = 0  # sample 0: every row in group 0, group 1 empty
    return groups, g


def make_input(shape, dtype, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 2 + 0.3).to(dtype)


def sum_tolerance(x: torch.Tensor, r: int) -> float:
    """SUM_RTOL * R * the largest finite |x| (a NaN or an inf sum must match exactly)."""
    values = x.double().abs()
    values = values[values.isfinite()]
    return SUM_RTOL * r * (values.max().item() if values.numel() else 0.0)


def assert_pool(x: torch.Tensor, groups, g: int) -> None:
    r = x.shape[1]
    total, top, arg = cpu.pool(x, groups, g, True)
    want_total, want_top, want_arg = reference.pool(x.double(), groups, g, True)
    assert total.dtype == torch.float32 and top.dtype == torch.float32
    assert arg.dtype == torch.int32
    assert total.shape == top.shape == arg.shape == (x.shape[0], g, x.shape[2])
    tol = sum_tolerance(x, r)
    torch.testing.assert_close(total.double(), want_total, rtol=0, atol=tol, equal_nan=True)
    torch.testing.assert_close(top.double(), want_top, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg, want_arg), (arg, want_arg)
    # Without the max: the same sums, bitwise.
    total_only, none_top, none_arg = cpu.pool(x, groups, g, False)
    assert none_top is None and none_arg is None
    torch.testing.assert_close(total_only, total, rtol=0, atol=0, equal_nan=True)


def wide(t: torch.Tensor | None, absolute: bool = False) -> torch.Tensor | None:
    """t in float64 (its absolute value with ``absolute``); None stays None."""
    if t is None:
        return None
    return t.double().abs() if absolute else t.double()


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers in the order of the values (neighbours differ by 1)."""
    bits = t.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_backward_close(got: torch.Tensor, want64: torch.Tensor, magnitude: torch.Tensor):
    """float32: within BACKWARD_RTOL * magnitude; bf16: within one bf16 ulp of the float64
    value rounded once (or within BACKWARD_RTOL * magnitude where terms cancel)."""
    assert got.dtype in DTYPES
    error = (got.double() - want64).abs()
    allowed = BACKWARD_RTOL * magnitude
    if got.dtype == torch.float32:
        assert (error <= allowed).all(), f"max error {error.max():.3g}"
        return
    ulps = (ordered_bits(got) - ordered_bits(want64.to(torch.bfloat16))).abs()
    bad = (ulps > 1) & (error > allowed)
    assert not bad.any(), f"{int(bad.sum())} elements more than 1 bf16 ulp off; max {ulps.max()}"


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize(("o", "r", "i", "n"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ops_match_reference(dtype, o, r, i, n, grouping) -> None:
    gen = torch.Generator().manual_seed(o * 1000 + r * 10 + i)
    groups, g = make_groups(grouping, n, r, gen)
    if groups is None:
        n = 1
    x = make_input((o, r, i), dtype, gen)
    grad = make_input((o, r, i), dtype, gen)

    # pool
    assert_pool(x, groups, g)
    _, _, arg = reference.pool(x.double(), groups, g, True)
    if grouping == "g2-empty":
        total, top, arg_k = cpu.pool(x, groups, g, True)
        per_n = o // n
        assert (total[:per_n, 1] == 0).all()
        assert (top[:per_n, 1] == float("-inf")).all()
        assert (arg_k[:per_n, 1] == -1).all()

    # dot
    got = cpu.dot(grad, x, groups, g)
    want = reference.dot(grad.double(), x.double(), groups, g)
    assert got.dtype == torch.float32 and got.shape == (o, g, i)
    products = grad.double() * x.double()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=sum_tolerance(products, r))

    # apply: bitwise the reference on the same-dtype inputs
    gate = torch.rand(o, g, i, generator=gen) * 1.5 - 0.25  # float32, some < 0 and > 1
    got = cpu.apply(x, gate, groups, g)
    want = reference.apply(x, gate, groups, g)
    assert got.dtype == dtype and want.dtype == dtype
    assert torch.equal(got, want)

    # backward, with and without the mean (bias) and max terms
    bias = torch.randn(o, g, i, generator=gen)
    dmax = torch.randn(o, g, i, generator=gen)
    gate_rounded = gate.to(dtype).double()  # the kernel applies the gate in grad's dtype
    for use_bias in (False, True):
        for use_max in (False, True):
            b = bias if use_bias else None
            a, d = (arg, dmax) if use_max else (None, None)
            got = cpu.backward(grad, gate, groups, g, b, a, d)
            assert got.dtype == dtype and got.shape == grad.shape
            want = reference.backward(grad.double(), gate_rounded, groups, g, wide(b), a, wide(d))
            magnitude = reference.backward(  # |grad * gate| + |bias| + |dmax| per element
                grad.double().abs(), gate_rounded.abs(), groups, g, wide(b, True), a, wide(d, True)
            )
            assert_backward_close(got, want, magnitude)


@pytest.mark.parametrize("i", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_apply_with_sigmoid_gates_is_exact(dtype, i) -> None:
    """Gates as a sigmoid gives them, two groups: each element is x times its own group's
    gate, one product (``x * gate.to(x.dtype)``), bitwise."""
    gen = torch.Generator().manual_seed(0)
    o, r = 8, 12
    x = make_input((o, r, i), dtype, gen)
    groups = torch.tensor([[0, 1] * (r // 2)], dtype=torch.int8)
    gate = torch.sigmoid(torch.randn(o, 2, i, generator=gen) * 3)
    got = cpu.apply(x, gate, groups, 2)
    want = reference.apply(x, gate, groups, 2)
    wrong = got != want
    assert not wrong.any(), (
        f"{int(wrong.sum())} of {wrong.numel()} elements differ from x * gate; "
        f"max |difference| {(got.double() - want.double()).abs().max():.3g}"
    )


@pytest.mark.parametrize("grouping", ["none", "g2", "g3"])
@pytest.mark.parametrize(("o", "r", "i", "n"), [(20, 9, 1, 1), (4, 9, 5, 2)], ids=["I1", "I5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_go_to_the_lowest_index(dtype, o, r, i, n, grouping) -> None:
    """Small integers: most maxima are tied. I = 1 with O = 20 runs a full 16-row block and a
    remainder."""
    gen = torch.Generator().manual_seed(7)
    groups, g = make_groups(grouping, n, r, gen)
    x = torch.randint(-2, 3, (o, r, i), generator=gen).to(dtype)
    assert_pool(x, groups, g)


@pytest.mark.parametrize("i", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_by_hand(dtype, i) -> None:
    row = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, -1.0])
    x = row.view(1, 6, 1).expand(2, 6, i).contiguous().to(dtype)
    _, top, arg = cpu.pool(x, None, 1, True)
    assert (top == 3).all() and (arg == 1).all()
    # With groups: group 0 holds rows 0, 2, 3, 5 (max 3 first at 3); group 1 rows 1, 4 (at 1).
    groups = torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.int8)
    _, top, arg = cpu.pool(x, groups, 2, True)
    assert (top == 3).all()
    assert (arg[:, 0] == 3).all() and (arg[:, 1] == 1).all()


@pytest.mark.parametrize(("o", "r", "i"), [(20, 7, 1), (3, 7, 4)], ids=["I1", "I4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_is_the_max(dtype, o, r, i) -> None:
    gen = torch.Generator().manual_seed(3)
    x = make_input((o, r, i), dtype, gen)
    x[0, 2] = float("nan")
    x[0, 4] = float("nan")
    x[1, 0] = float("nan")  # NaN first
    x[2, 3] = float("nan")
    x[2, 5] = 1e30  # a larger value after the NaN
    assert_pool(x, None, 1)
    _, top, arg = cpu.pool(x, None, 1, True)
    assert top[:3].isnan().all()
    assert (arg[0] == 2).all() and (arg[1] == 0).all() and (arg[2] == 3).all()
    groups = torch.tensor([[0, 1, 1, 0, 1, 1, 0]], dtype=torch.int8)
    assert_pool(x, groups, 2)


@pytest.mark.parametrize(("o", "r", "i"), [(20, 5, 1), (3, 5, 4)], ids=["I1", "I4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_minus_inf(dtype, o, r, i) -> None:
    x = torch.full((o, r, i), float("-inf"), dtype=dtype)
    total, top, arg = cpu.pool(x, None, 1, True)
    assert (total == float("-inf")).all() and (top == float("-inf")).all()
    assert (arg == 0).all()
    groups = torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.int8)
    _, top, arg = cpu.pool(x, groups, 2, True)
    assert (top == float("-inf")).all()
    assert (arg[:, 0] == 1).all() and (arg[:, 1] == 0).all()  # each group's first member
    assert_pool(x, groups, 2)


def _all_ops(x, grad, gate, bias, dmax, groups, g):
    total, top, arg = cpu.pool(x, groups, g, True)
    return [
        total,
        top,
        arg,
        cpu.dot(grad, x, groups, g),
        cpu.apply(x, gate, groups, g),
        cpu.backward(grad, gate, groups, g, bias, arg, dmax),
    ]


@pytest.mark.parametrize("grouping", ["none", "g2"])
@pytest.mark.parametrize(("o", "r", "i", "n"), [(34, 37, 1, 2), (8, 37, 9, 2)], ids=["I1", "I9"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_thread_count_does_not_change_results(dtype, o, r, i, n, grouping) -> None:
    gen = torch.Generator().manual_seed(11)
    groups, g = make_groups(grouping, n, r, gen)
    x, grad = make_input((o, r, i), dtype, gen), make_input((o, r, i), dtype, gen)
    gate, bias, dmax = (torch.randn(o, g, i, generator=gen) for _ in range(3))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops(x, grad, gate, bias, dmax, groups, g)
        torch.set_num_threads(2)
        two = _all_ops(x, grad, gate, bias, dmax, groups, g)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_fallback_without_compiler(monkeypatch, tmp_path) -> None:
    from attnzoo.registry import create_attention

    monkeypatch.setattr(cpu, "compiler", lambda: None)
    monkeypatch.setattr(cpu, "_state", {})  # forget the loaded library; restored afterwards
    monkeypatch.setenv("ATTNZOO_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("ATTNZOO_KERNELS", raising=False)
    assert not cpu.available()
    assert "compiler" in cpu.reason()
    with kernels.kernels("auto"):
        assert kernels.describe("cpu").startswith("PyTorch")
        assert "compiler" in kernels.describe("cpu")
        assert kernels.backend("cpu") == "pytorch"
        assert kernels.backend("cpu", torch.bfloat16) == "pytorch"
        se = create_attention("se", 16).train()
        x = torch.randn(2, 16, 4, 4, requires_grad=True)
        se(x).square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in se.parameters())
    with kernels.kernels("on"), pytest.raises(RuntimeError, match="compiler"):
        kernels.backend("cpu")
    assert list(tmp_path.iterdir()) == []


def test_build_into_empty_cache(monkeypatch, tmp_path) -> None:
    cache = tmp_path / "fresh" / "kernels"
    monkeypatch.setenv("ATTNZOO_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(cpu, "_state", {})
    assert cpu.available(), cpu.reason()
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("gates-") and files[0].endswith(".so"), files
    assert cpu.describe().startswith("C++") and str(cache) in cpu.describe()
    built = (cache / files[0]).stat().st_mtime_ns
    # The freshly built library computes what the reference does.
    gen = torch.Generator().manual_seed(5)
    assert_pool(make_input((6, 7, 1), torch.float32, gen), None, 1)
    # A second process (a fresh state) loads the cached file instead of building again.
    monkeypatch.setattr(cpu, "_state", {})
    assert cpu.available()
    assert sorted(p.name for p in cache.iterdir()) == files
    assert (cache / files[0]).stat().st_mtime_ns == built


def test_invalid_mode(monkeypatch) -> None:
    for call in (lambda: kernels.kernels("fast").__enter__(), lambda: kernels.set_mode("yes")):
        with pytest.raises(ValueError) as info:
            call()
        assert all(choice in str(info.value) for choice in kernels.MODES), info.value
    monkeypatch.setenv("ATTNZOO_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, on, off"):
        kernels.mode()
    monkeypatch.delenv("ATTNZOO_KERNELS")
    assert kernels.mode() in kernels.MODES


# ------------------------------------------------------------------ triplet's kernels
TRI_SHAPES = [(2, 3, 4, 5), (1, 1, 1, 1), (3, 16, 7, 5), (2, 5, 1, 17), (2, 1, 6, 33)]
TRI_WHICH = [(True, True, True), (False, True, True), (True, False, True)]


def _tri_views(x: torch.Tensor) -> list[torch.Tensor]:
    """x [N, D1, D2, D3] as the [O, R, I] views reduced over D1, D2 and D3."""
    n, d1, d2, d3 = x.shape
    return [x.reshape(n, d1, d2 * d3), x.reshape(n * d1, d2, d3), x.reshape(n * d1 * d2, d3, 1)]


@pytest.mark.parametrize("which", TRI_WHICH, ids=["all", "no-d1", "no-d2"])
@pytest.mark.parametrize("shape", TRI_SHAPES, ids=["x".join(map(str, s)) for s in TRI_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triplet_ops_match_reference(dtype, shape, which) -> None:
    """tri_pool / tri_dot are the three single-dim ``pool`` / ``dot`` at once; tri_broadcast
    is ``apply`` / ``backward`` with the three branches' gates summed (in the PyTorch path's
    order) and their bias and max terms added."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    n, d1, d2, d3 = shape
    pooled = cpu.tri_pool(x, which, True)
    dots = cpu.tri_dot(grad, x, which)
    terms, want_apply, want_grad = [], [], []
    broadcast = [(n, 1, d2, d3), (n, d1, 1, d3), (n, d1, d2, 1)]
    for k, (view, gview) in enumerate(zip(_tri_views(x), _tri_views(grad), strict=True)):
        if not which[k]:
            assert pooled[k] is None and dots[k] is None
            terms.append(None)
            continue
        total, top, arg = pooled[k]
        ref_sum, ref_max, ref_arg = reference.pool(view.double(), None, 1, True)
        scale = 1e-6 * view.shape[1] * max(1.0, view.float().abs().max().item())
        torch.testing.assert_close(total.double().flatten(), ref_sum.flatten(), rtol=0, atol=scale)
        assert torch.equal(top.double().flatten(), ref_max.flatten())
        assert torch.equal(arg.flatten(), ref_arg.flatten())
        ref_dot = reference.dot(gview.double(), view.double(), None, 1)
        torch.testing.assert_close(
            dots[k].double().flatten(), ref_dot.flatten(), rtol=0, atol=10 * scale
        )
        gate = torch.rand(total.shape, generator=gen) / 3
        bias = torch.randn(total.shape, generator=gen)
        dmax = torch.randn(total.shape, generator=gen)
        terms.append((gate, bias, arg, dmax))
        want_apply.append(gate.view(broadcast[k]))
        positions = torch.arange(shape[k + 1]).view([1 if i != k + 1 else -1 for i in range(4)])
        hit = positions == arg.view(broadcast[k])
        want_grad.append(
            bias.view(broadcast[k]).double() + torch.where(hit, dmax.view(broadcast[k]).double(), 0)
        )
    weight = want_apply[0]
    for w in want_apply[1:]:
        weight = weight + w
    out = cpu.tri_broadcast(x, [None if t is None else (t[0], None, None, None) for t in terms])
    assert torch.equal(out, x * weight.to(dtype)), "the product equals x * w.to(x.dtype) bitwise"
    got = cpu.tri_broadcast(grad, terms).double()
    want = grad.double() * weight.to(dtype).double() + sum(want_grad)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the float32 result: within one bf16 ulp
        ulp = want.abs().clamp_min(1e-30) * 2.0**-7
        assert ((got - want).abs() <= ulp).all()


def test_triplet_ties_take_the_lowest_index() -> None:
    x = torch.zeros(1, 3, 4, 5)
    x[0, 1, :, :] = 2.0  # D1 ties nowhere; D2 and D3 tie everywhere in that slice
    (s1, m1, a1), (s2, m2, a2), (s3, m3, a3) = cpu.tri_pool(x, (True, True, True), True)
    assert (a1 == 1).all() and (m1 == 2).all()
    assert (a2 == 0).all() and (a3 == 0).all()


# ------------------------------------------------------------------ the spatial gates' conv
CONV_SHAPES = [
    (3, 2, 7, 5, 7),
    (2, 1, 1, 1, 7),
    (4, 2, 32, 32, 7),
    (2, 3, 9, 40, 3),
    (1, 2, 2, 3, 1),
    (2, 2, 5, 33, 5),
    (1, 2, 3, 70, 7),
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=["x".join(map(str, s)) for s in CONV_SHAPES])
def test_conv_matches_float64(shape) -> None:
    """conv / conv_grad_input / conv_grad_weight against F.conv2d and its autograd in float64
    (zero "same" padding; widths below, at and above the 32-column block)."""
    b, c, h, w, k = shape
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(b, c, h, w, generator=gen)
    weight = torch.randn(1, c, k, k, generator=gen)
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    y = torch.nn.functional.conv2d(xd, wd, padding=k // 2)
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad)
    got = cpu.conv(x, weight[0].contiguous())
    got_x = cpu.conv_grad_input(grad[:, 0].float().contiguous(), weight[0].contiguous(), c)
    got_w = cpu.conv_grad_weight(grad[:, 0].float().contiguous(), x, k)
    taps = c * k * k
    torch.testing.assert_close(got.double(), y[:, 0].detach(), rtol=0, atol=1e-6 * taps * 4)
    torch.testing.assert_close(got_x.double(), xd.grad, rtol=0, atol=1e-6 * taps * 4)
    scale = b * h * w * 1e-6 * 4
    torch.testing.assert_close(got_w.double(), wd.grad[0], rtol=0, atol=scale)
