"""SE, ECA, CBAM and HAM with their gates on the C++ kernels (``attnzoo.kernels``, the
``attention/fused.py`` node) against the PyTorch paths.

float32 training (forward + backward): the kernel path and the float32 plain path
(``plain_gates``) are both compared with the float64 plain path on the same input; the kernel
path must be within a float32 tolerance of it and no further than ``ERROR_RATIO`` times the
float32 plain path's own error. Plus BN running statistics, the input gradient's layout,
eval-mode inference, bf16 autocast (kernels on against off) and maps whose every position
ties for the max.
"""

from __future__ import annotations

import copy

import pytest
import torch

from attnzoo import kernels
from attnzoo.attention.layers import plain_gates
from attnzoo.kernels import cpu
from attnzoo.registry import create_attention
from attnzoo.utils.random_weights import randomize_

if not cpu.available():
    pytest.skip(f"C++ gate kernels not available: {cpu.reason()}", allow_module_level=True)

CASES = [
    ("se", {}),
    ("se", {"rd_rule": "round8"}),
    ("eca", {}),
    ("cbam", {}),
    ("cbam", {"adaptive": True}),
    ("cbam", {"spatial": False}),
    ("cbam", {"max_pool": False}),
    ("ham", {}),
    ("ham", {"adaptive": False, "kernel_size": 3}),
    ("ham", {"spatial": "cbam"}),
    ("ham", {"spatial": None}),
    ("triplet", {}),
    ("triplet", {"no_spatial": True}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES]
# (3, 16, 7, 5): odd sizes; (1, 16, 1, 1): H * W = 1 and a batch of one; (2, 32, 8, 8);
# (2, 16, 1, 9): H = 1.
SHAPES = [(3, 16, 7, 5), (1, 16, 1, 1), (2, 32, 8, 8), (2, 16, 1, 9)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
LAYOUTS = ["nchw", "nhwc"]

# float32 against the float64 plain path, per element: |error| <= RTOL * |reference| +
# ATOL * max(1, max |reference|) (the scale: a parameter gradient is a sum over the batch and
# the positions, its small elements come out of cancellation). Measured worst: the kernel
# path uses 30% of this, the float32 plain path 17%.
RTOL, ATOL = 1e-4, 1e-5
# ... and max |kernel - float64| <= ERROR_RATIO * max |plain float32 - float64|
# + ERROR_FLOOR * max |float64| (the floor: a few float32 ulps where the plain path happens
# to be exact). Measured worst: 42% of this bound.
ERROR_RATIO, ERROR_FLOOR = 10.0, 1e-6
# bf16 autocast, kernels on against off: max |on - off| <= rtol * max |off| per tensor (or
# the kernel path nearer to float64, see test_bf16_autocast). Measured worst on - off: outputs
# 0.7% (HAM), gradients 4.0% for SE/ECA/CBAM (a CBAM MLP bias: a sum that cancels).
BF16_OUT_RTOL, BF16_GRAD_RTOL = 2e-2, 5e-2
# HAM's separated spatial gate: bf16 channel values tie for a group's max (2 of 210 group
# maxima in the (3, 16, 7, 5) case); the kernel sends the max gradient to the lowest
# channel, the PyTorch node to the highest-weighted one, so the gradient of those elements,
# and through the channel gate's backward the channel conv's weight gradient, differ by a
# whole max term. Measured worst: 8.9% (input gradient), 13.1% (channel.conv.weight).
BF16_SEPARATED_GRAD_RTOL = 0.25


def build(name: str, kwargs: dict, channels: int) -> torch.nn.Module:
    """The module with random weights and BN statistics (as tests/attention's ``randomize``)."""
    torch.manual_seed(0)
    return randomize_(create_attention(name, channels, **kwargs)).train()


def make_input(shape, layout: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, grad_out) in float32, in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.3
    grad = torch.randn(shape, generator=gen)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    return x, grad


def memory_format(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "nhwc" else torch.contiguous_format


@pytest.fixture
def kernel_calls(monkeypatch) -> list[torch.dtype]:
    """The dtypes of the maps the C++ ``pool`` or ``tri_pool`` ran on (whether the kernels
    were used)."""
    calls: list[torch.dtype] = []
    real = cpu.pool

    def spy(x, groups, g, want_max):  # noqa: ANN001, ANN202
        calls.append(x.dtype)
        return real(x, groups, g, want_max)

    real_tri = cpu.tri_pool

    def tri_spy(x, which, want_max):  # noqa: ANN001, ANN202
        calls.append(x.dtype)
        return real_tri(x, which, want_max)

    monkeypatch.setattr(cpu, "pool", spy)
    monkeypatch.setattr(cpu, "tri_pool", tri_spy)
    return calls


def run(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Forward + backward: the output, the input gradient, parameter gradients, buffers."""
    x = x.clone().requires_grad_()  # clone keeps the layout
    out = module(x)
    out.backward(grad)
    result = {"out": out.detach(), "grad_x": x.grad}
    for name, param in module.named_parameters():
        result[f"grad:{name}"] = param.grad
    for name, buffer in module.named_buffers():
        result[f"buffer:{name}"] = buffer.detach().clone()
    return result


def errors(got: torch.Tensor, base: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    want = want.double()
    return (
        (got.double() - want).abs().max().item(),
        (base.double() - want).abs().max().item(),
    )


def assert_float32_close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """|got - want| <= RTOL |want| + ATOL max(1, max |want|); returns max |want|."""
    scale = want.double().abs().max().item()
    torch.testing.assert_close(
        got.double(),
        want.double(),
        rtol=RTOL,
        atol=ATOL * max(1.0, scale),
        msg=lambda m: f"{what}: {m}",
    )
    return scale


def assert_near_reference(got: dict, base: dict, want: dict, what: str) -> None:
    """got (kernels, float32) and base (plain, float32) against want (plain, float64)."""
    assert got.keys() == want.keys() == base.keys()
    for key, reference in want.items():
        a, b = got[key], base[key]
        if reference is None:
            assert a is None and b is None, f"{what} {key}: gradient where the reference has none"
            continue
        assert a is not None, f"{what} {key}: no gradient on the kernel path"
        if key == "buffer:num_batches_tracked" or key.endswith("num_batches_tracked"):
            assert torch.equal(a, reference) and torch.equal(b, reference), key
            continue
        scale = assert_float32_close(a, reference, f"{what} {key}")
        ours, theirs = errors(a, b, reference)
        assert ours <= ERROR_RATIO * theirs + ERROR_FLOOR * scale, (
            f"{what} {key}: kernel error {ours:.3g}, plain float32 error {theirs:.3g}, "
            f"largest value {scale:.3g}"
        )


def reference_or_skip(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """The float64 plain path; skips the case where the module refuses the shape."""
    with plain_gates():
        try:
            return run(copy.deepcopy(module).double(), x.double(), grad.double())
        except (ValueError, RuntimeError) as error:
            pytest.skip(f"the plain path refuses {tuple(x.shape)}: {error}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_training_matches_float64(name, kwargs, layout, shape, kernel_calls) -> None:
    module = build(name, kwargs, shape[1])
    x, grad = make_input(shape, layout)
    want = reference_or_skip(module, x, grad)
    plain = copy.deepcopy(module)
    with plain_gates():
        base = run(plain, x, grad)
    assert kernel_calls == []
    with kernels.kernels("on"):
        got = run(module, x, grad)
    assert kernel_calls and set(kernel_calls) == {torch.float32}, "the kernels were not used"
    assert got["out"].dtype == torch.float32
    assert got["grad_x"].is_contiguous(memory_format=memory_format(layout)), (
        "the input gradient keeps the input's layout"
    )
    assert_near_reference(got, base, want, f"{name} {kwargs} {layout} {shape}")
    for key in got:  # BN running statistics: the kernel path's equal the plain path's
        if key.startswith("buffer:"):
            torch.testing.assert_close(got[key], base[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_eval_inference(name, kwargs, layout, shape, kernel_calls) -> None:
    """No-grad inference on the kernels equals the autograd node's forward in eval mode (and
    the plain paths within float32 tolerance)."""
    module = build(name, kwargs, shape[1]).eval()
    x, _ = make_input(shape, layout)
    with plain_gates(), torch.no_grad():
        want = copy.deepcopy(module).double()(x.double())
        base = copy.deepcopy(module)(x)
    with kernels.kernels("on"):
        with torch.no_grad():
            inferred = module(x)
        assert kernel_calls, "no-grad inference did not use the kernels"
        traced = module(x.clone().requires_grad_())
    assert traced.requires_grad
    assert inferred.is_contiguous(memory_format=memory_format(layout))
    # The same kernel passes and the same transforms: the same values.
    assert torch.equal(inferred, traced.detach()), "no grad differs from the autograd node"
    for what, result in (("no grad", inferred), ("autograd node", traced.detach())):
        scale = assert_float32_close(result, want, f"{what} against float64")
        ours, theirs = errors(result, base, want)
        assert ours <= ERROR_RATIO * theirs + ERROR_FLOOR * scale, (what, ours, theirs)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_bf16_autocast(name, kwargs, layout, shape, kernel_calls) -> None:
    """A bf16 map (as a conv under autocast gives) with float32 weights: kernels on vs off.

    Each tensor: max |on - off| within the bf16 tolerance, or, where the two differ by more,
    the kernel path the closer of the two to the float64 plain path on the same (bf16) input
    (the PyTorch path rounds sums and products to bf16 where the kernels keep float32)."""
    module = build(name, kwargs, shape[1])
    x, grad = make_input(shape, layout)
    x, grad = x.bfloat16(), grad.bfloat16()
    want = reference_or_skip(module, x.float(), grad.float())
    off = copy.deepcopy(module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kernels.kernels("off"):
            base = run(off, x, grad)
        assert kernel_calls == []
        with kernels.kernels("on"):
            got = run(module, x, grad)
    assert kernel_calls and torch.bfloat16 in kernel_calls, "the bf16 kernels were not used"
    assert got["out"].dtype == base["out"].dtype
    assert got["grad_x"].dtype == torch.bfloat16
    assert got["grad_x"].is_contiguous(memory_format=memory_format(layout))
    separated = name == "ham" and kwargs.get("spatial", "ham") == "ham"
    for key, b in base.items():
        a = got[key]
        if b is None:
            assert a is None, key
            continue
        if key.startswith("buffer:"):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
            continue
        rtol = BF16_OUT_RTOL if key == "out" else BF16_GRAD_RTOL
        if separated and key != "out":
            rtol = BF16_SEPARATED_GRAD_RTOL
        scale = b.double().abs().max().item()
        error = (a.double() - b.double()).abs().max().item()
        if error <= rtol * scale + 1e-6:
            continue
        ours, theirs = errors(a, b, want[key])
        assert ours <= theirs, (
            f"{key}: kernels on vs off differ by {error:.3g} (largest |value| {scale:.3g}), and "
            f"the kernel path is further from float64 ({ours:.3g}) than the PyTorch path "
            f"({theirs:.3g})"
        )


def has_max(name: str, kwargs: dict) -> bool:
    """Whether the module's channel gate max-pools (HAM's always does)."""
    return name == "ham" or (name == "cbam" and kwargs.get("max_pool", True))


CHANNEL_ONLY = {"cbam": {"spatial": False}, "ham": {"spatial": None}}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_max_ties(name, kwargs, layout, kernel_calls) -> None:
    """Every channel's H x W map constant: every position ties for the max.

    SE, ECA and CBAM without max pooling: the same output and gradients as the plain path.
    With a max: the same output; the kernel sends each map's max gradient to position 0 (the
    lowest index), the plain path's pooling kernel to one tied position of its own, so the
    gradients agree summed over each map; a channel gate alone (nothing after it) has
    ``grad_x - grad_out * w`` equal to the mean term at every position but 0.
    """
    shape = (4, 32, 3, 4)  # CBAM's MLP: 2 hidden units, 4 samples (not all at the ReLU's 0)
    module = build(name, kwargs, shape[1])
    gen = torch.Generator().manual_seed(2)
    levels = torch.randn(shape[0], shape[1], 1, 1, generator=gen) * 2 + 0.3
    x = levels.expand(shape).contiguous(memory_format=memory_format(layout))
    grad = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format(layout))
    want = reference_or_skip(module, x, grad)
    with plain_gates():
        base = run(copy.deepcopy(module), x, grad)
    with kernels.kernels("on"):
        got = run(module, x, grad)
    assert kernel_calls
    if not has_max(name, kwargs):
        assert_near_reference(got, base, want, f"ties {name} {kwargs} {layout}")
        return
    for key in got:
        assert got[key] is None or torch.isfinite(got[key]).all(), key
    assert_float32_close(got["out"], want["out"], "output")
    for key in got:  # the parameters see only the max value, not where it is
        if key.startswith(("grad:", "buffer:")):
            assert_float32_close(got[key], want[key], key)
    # Both paths send each map's whole max gradient to one position: equal sums per map.
    positions = shape[2] * shape[3]
    want_sums = want["grad_x"].sum((2, 3))
    for what, result in (("kernels", got), ("plain float32", base)):
        torch.testing.assert_close(
            result["grad_x"].double().sum((2, 3)),
            want_sums,
            rtol=RTOL,
            atol=ATOL * positions * max(1.0, want_sums.abs().max().item()),
            msg=lambda m, what=what: f"{what}, per-map sums of the input gradient: {m}",
        )
    if CHANNEL_ONLY.get(name) != kwargs:
        return
    # out = x * w with w per map: grad_x - grad_out * w = mean term + [position 0] * max term.
    weight = got["out"].double() / x.double()
    rest = (got["grad_x"].double() - grad.double() * weight).flatten(2)  # (N, C, H * W)
    mean_term = rest[:, :, 1:2]
    torch.testing.assert_close(
        rest[:, :, 1:], mean_term.expand_as(rest[:, :, 1:]), rtol=0, atol=ATOL
    )  # the same at every position but 0
    max_term = rest[:, :, 0] - mean_term[:, :, 0]
    assert max_term.abs().max() > 100 * ATOL, "no max gradient to see"
    # ... and at position 0 the whole max term: the per-map sums above hold it once.
    want_rest = (want["grad_x"] - grad.double() * want["out"] / x.double()).flatten(2)
    torch.testing.assert_close(rest.sum(2), want_rest.sum(2), rtol=RTOL, atol=ATOL * positions)


def test_plain_gates_bypasses_the_kernels(kernel_calls) -> None:
    """``plain_gates()`` selects the plain expression: no kernel runs, even with the kernels on."""
    x, grad = make_input((2, 16, 6, 5), "nhwc")
    for name in ("se", "cbam", "ham", "triplet"):
        module = build(name, {}, 16)
        with kernels.kernels("on"), plain_gates():
            run(module, x, grad)
    assert kernel_calls == []
    with kernels.kernels("on"):
        run(build("se", {}, 16), x, grad)
    assert kernel_calls, "the kernels run outside plain_gates()"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["se", "eca", "triplet"])
def test_finite_differences_in_float32(name, layout, kernel_calls) -> None:
    """Central differences of a random projection of the output, in float32 on the kernels,
    against the kernels' backward (eval mode: BN fixed; SE/ECA are smooth, triplet has max
    kinks that the step does not cross for this seed). The float64 reference tests
    above are the tight check; this one needs no other path."""
    module = build(name, {}, 16).eval()
    x, _ = make_input((2, 16, 5, 7), layout, seed=4)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(x.shape, generator=gen)
    direction = torch.randn(x.shape, generator=gen).contiguous(memory_format=memory_format(layout))
    with kernels.kernels("on"):
        xg = x.clone().requires_grad_()
        (module(xg) * weight).sum().backward()
        predicted = (xg.grad.double() * direction.double()).sum().item()
        eps = 1e-3  # 1e-2 crosses curvature: the float64 plain path is 0.6% off there too
        with torch.no_grad():
            up = (module(x + eps * direction) * weight).double().sum().item()
            down = (module(x - eps * direction) * weight).double().sum().item()
    assert kernel_calls
    numeric = (up - down) / (2 * eps)
    assert abs(numeric - predicted) <= 2e-3 * max(1.0, abs(predicted)), (numeric, predicted)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_outputs_take_in_place_ops(name, kwargs, kernel_calls) -> None:
    """The nodes' outputs are fresh tensors, not views made inside the node: a block may add
    its shortcut in place (timm's ``x += shortcut``), and the gradient is still right."""
    module = build(name, kwargs, 16)
    x, grad = make_input((2, 16, 6, 5), "nhwc")
    shortcut = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    with plain_gates():
        want = run(copy.deepcopy(module), x, grad)
    xk = x.clone().requires_grad_()
    with kernels.kernels("on"):
        out = module(xk)
        out += shortcut
        out.backward(grad)
    assert kernel_calls
    torch.testing.assert_close(out.detach() - shortcut, want["out"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(xk.grad, want["grad_x"], rtol=RTOL, atol=ATOL)
