"""Every registered attention under autocast (bf16 and fp16), on the CPU and, where present,
on CUDA (the ``device`` fixture; CPU autocast takes fp16 as well in this torch).

1. Softmaxes run in float32. Every softmax and fused attention kernel (``aten._softmax``,
   ``aten._scaled_dot_product_*``, forward and backward) that a module dispatches under
   autocast gets float32 inputs: the modules compute their energies and softmax with
   ``layers.in_float32`` / ``layers.conv_softmax`` (autocast off, inputs promoted).
2. fp16 energies that overflow. With inputs (or the logit conv's weights) scaled so that the
   energies computed the naive way in fp16 pass 65504 (asserted: those energies hold an inf,
   and a softmax over a row with an inf is NaN), each softmax module's output stays finite
   and agrees with its float32 output at (nearly) every position.
3. bf16 autocast against float32, forward and backward, for every registered attention. See
   ``test_bfloat16_autocast_matches_float32`` for the tolerances and why they have that size.
4. The fused gate nodes (``layers.pooled_gate``, HAM's separated spatial gate) under autocast:
   same dtypes as the plain expressions they replace (output, input gradient), float32
   gradients for float32 parameters, and values within the bf16 tolerances of the plain path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import attnzoo
from attnzoo.attention.layers import autocast_off, conv_softmax, in_float32, plain_gates
from attnzoo.registry import attention_level, create_attention
from attnzoo.utils.random_weights import randomize_

NAMES = attnzoo.list_attentions(level=("module", "block", "conv"))
CHANNELS = 16
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# The modules with a softmax (over positions, channels, branches or scales).
SOFTMAX_MODULES = {
    "a2",
    "csm",
    "danet_cam",
    "danet_pam",
    "ema",
    "epsa",
    "gc",
    "nonlocal",
    "polarized",
    "rcca",
    "sk",
    "spatial_softmax",
    "splat",
}
# A zero-init residual scale hides its branch: open it so the comparison sees the branch.
RESIDUAL_SCALES = ("gamma", "beta", "spatial.gamma")


def build(name: str, device: torch.device, seed: int = 0, train: bool = True) -> nn.Module:
    """``name`` with random weights (N(0, 1/fan_in), so no gate sits at 0.5 and no branch is
    hidden behind a zero scale), on ``device``. The BatchNorms' shifts are made positive, so
    that a one-unit hidden layer (C = 16, r = 16) behind a ReLU is not dead at random."""
    torch.manual_seed(seed)
    # bridge: 4 hidden units rather than C / 16 = 1, which one ReLU can leave all dead.
    kwargs = {"earlier_channels": (16, 8), "reduction": 4} if name == "bridge" else {}
    module = randomize_(create_attention(name, CHANNELS, **kwargs))
    with torch.no_grad():
        for param_name, param in module.named_parameters():
            if param.dim() == 0 and param_name in RESIDUAL_SCALES:
                param.fill_(1.0)
        for norm in module.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.bias is not None:
                norm.bias.abs_()
    return module.train(train).to(device)


def extra_inputs(name: str, n: int, device: torch.device) -> tuple:
    """What a block-level module reads besides x: the block's earlier outputs."""
    if attention_level(name) != "block":
        return ()
    return ([torch.randn(n, 16, 8, 8, device=device), torch.randn(n, 8, 8, 8, device=device)],)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius), in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm()).item()


# --- 0. the helpers ----------------------------------------------------------------------


def test_in_float32_promotes_narrow_floats_and_turns_autocast_off(device: torch.device) -> None:
    @in_float32
    def probe(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, scale: float):
        assert not torch.is_autocast_enabled(device.type)
        return a, b, index, (a @ a.T) * scale  # bf16 if autocast were on

    a = torch.randn(3, 4, device=device, dtype=torch.bfloat16)
    b64 = torch.randn(3, 4, device=device, dtype=torch.float64)
    index = torch.arange(3, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got_a, got_b, got_index, product = probe(a, b64, index, 2.0)
        assert torch.is_autocast_enabled(device.type)  # restored on the way out
    assert got_a.dtype == torch.float32 and torch.equal(got_a, a.float())
    assert got_b is b64 and got_index is index  # float64 and integers pass as they are
    assert product.dtype == torch.float32
    x = torch.randn(3, 4, device=device)
    assert probe(x, x, index, 1.0)[0] is x  # float32: the same tensor, no copy


def test_autocast_off_is_a_null_context_where_nothing_autocasts() -> None:
    with autocast_off("meta"):  # torch.autocast("meta") would raise
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_off("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_conv_softmax_is_the_plain_expression_in_float32() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 3, 3, padding=1)
    x = torch.randn(2, 16, 7, 5)
    assert torch.equal(conv_softmax(conv, x, dim=-1), torch.softmax(conv(x).flatten(2), -1))
    assert torch.equal(conv_softmax(conv, x, dim=1), torch.softmax(conv(x).flatten(2), 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        narrow = conv_softmax(conv, x.bfloat16(), dim=-1)
    assert narrow.dtype == torch.float32
    want = torch.softmax(conv(x.bfloat16().float()).flatten(2), -1)
    torch.testing.assert_close(narrow, want)


# --- 1. softmaxes in float32 -------------------------------------------------------------


class SoftmaxInputs(TorchDispatchMode):
    """Records the floating input dtypes of every softmax and fused attention op (forward and
    backward; the dispatch mode sees the dtypes autocast has already chosen)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        op = str(func)
        if "softmax" in op or "scaled_dot_product" in op:
            dtypes = {
                a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()
            }
            self.calls.append((op, dtypes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_runs_in_float32_under_autocast(
    name: str, dtype: torch.dtype, device: torch.device
) -> None:
    module = build(name, device)
    x = torch.randn(2, CHANNELS, 8, 8, device=device, requires_grad=True)
    record = SoftmaxInputs()
    with record:
        with torch.autocast(device.type, dtype=dtype):
            out = module(x, *extra_inputs(name, 2, device))
        out.float().sum().backward()
    narrow = [(op, d) for op, d in record.calls if d - {torch.float32, torch.float64}]
    assert not narrow, f"{name}: softmax ops on narrow dtypes under {dtype} autocast: {narrow}"
    # Not vacuous: the softmax modules did dispatch softmaxes, and no other module does (a
    # new one with a softmax belongs in SOFTMAX_MODULES, and in its fp16 overflow case).
    assert bool(record.calls) == (name in SOFTMAX_MODULES), record.calls


# --- 2. fp16 energies past 65504 ---------------------------------------------------------


def _qk(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Q^T K over all position pairs, (N, HW, HW), in the inputs' dtype."""
    return torch.bmm(query.flatten(2).transpose(1, 2), key.flatten(2))


def _scale_weight(conv: nn.Conv2d, factor: float) -> None:
    with torch.no_grad():
        conv.weight.mul_(factor)


# name -> (input scale, prepare(module), naive fp16 energies(module, x) under autocast)
OVERFLOW_CASES: dict[str, tuple[float, Callable, Callable]] = {
    "danet_pam": (300.0, lambda m: None, lambda m, x: _qk(m.query(x), m.key(x))),
    "csm": (
        300.0,
        lambda m: None,
        lambda m, x: _qk(m.spatial.query(m.channel(x)), m.spatial.key(m.channel(x))),
    ),
    "danet_cam": (
        300.0,
        lambda m: None,
        lambda m, x: torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2)),
    ),
    "rcca": (
        1000.0,
        lambda m: None,
        lambda m, x: torch.einsum("ncyx,ncyv->nyxv", m.query(x), m.key(x)),
    ),
    "nonlocal": (300.0, lambda m: None, lambda m, x: _qk(m.theta(x), m.phi(x))),
    # The conv-logit modules: their energies are a conv of x itself; a large conv weight
    # (x stays well inside fp16) makes them overflow.
    "spatial_softmax": (
        100.0,
        lambda m: _scale_weight(m.conv, 1000.0),
        lambda m, x: m.conv(x),
    ),
    "gc": (
        100.0,
        lambda m: _scale_weight(m.context_conv, 1000.0),
        lambda m, x: m.context_conv(x),
    ),
    "a2": (100.0, lambda m: _scale_weight(m.gather_conv, 1000.0), lambda m, x: m.gather_conv(x)),
    "polarized": (
        100.0,
        lambda m: _scale_weight(m.channel_query, 1000.0),
        lambda m, x: m.channel_query(x),
    ),
}
# The softmax modules without a case, and why: their energies are not a product computed for
# the softmax but an output of the module's own layers (EMA: the spatial means of a GroupNorm
# output and of a 3x3 conv output, which would overflow before any softmax; EPSA, SK, splat:
# a small MLP's output per channel). Their softmaxes still run in float32 (test 1).
NO_OVERFLOW_CASE = {"ema", "epsa", "sk", "splat"}


def test_overflow_cases_cover_the_softmax_modules() -> None:
    assert set(OVERFLOW_CASES) | NO_OVERFLOW_CASE == SOFTMAX_MODULES


@pytest.mark.parametrize("name", sorted(OVERFLOW_CASES))
def test_fp16_energies_past_65504_stay_finite(name: str, device: torch.device) -> None:
    """The naive fp16 energies overflow (so the unfixed module, which computed them so, gave
    NaN); the module's output is finite, and at 90% of the positions (or more) within 1e-2 of
    its float32 output (the position's error norm over channels, against the output's mean
    norm per position). Not at all of them: the projections (Q, K) still run in fp16 under
    autocast, which moves an energy of ~1e5 by ~50, and a softmax row whose two largest
    energies are that close picks the other one, in the module's float32 output as much as
    in its fp16 one (measured over 20 seeds: at least 95% of positions agree, 100% for the
    modules whose energies are a conv of x itself, computed in float32 from x)."""
    scale, prepare, naive_energies = OVERFLOW_CASES[name]
    module = build(name, device, train=False)
    prepare(module)
    x = torch.randn(2, CHANNELS, 8, 8, device=device) * scale
    assert x.abs().max() < FP16_MAX / 10  # x itself is far inside fp16's range
    with torch.no_grad():
        want = module(x)
        with torch.autocast(device.type, dtype=torch.float16):
            energies = naive_energies(module, x)
            got = module(x)
    assert energies.dtype == torch.float16 and not torch.isfinite(energies).all()
    with torch.no_grad():
        naive_softmax = torch.softmax(energies.flatten(1), dim=-1)
    assert torch.isnan(naive_softmax).any()  # what the module fed on before the fix
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    position_error = (got.float() - want).norm(dim=1) / want.norm(dim=1).mean()
    assert (position_error < 1e-2).float().mean() >= 0.9, relative_error(got, want)


# --- 3. bf16 autocast against float32 ----------------------------------------------------

# Relative Frobenius errors ||bf16 - fp32|| / ||fp32||; the test's docstring says why.
FORWARD_TOLERANCE = 2e-2
GRADIENT_TOLERANCE = 5e-2
# Modules whose gradient passes a kink (ReLU, max) that bf16 rounding moves values across.
# Their forward error is as small as the others'; their gradient error is not.
KINK_GRADIENT_TOLERANCE = 0.3
KINKED = {
    "bam": "ReLU after the BatchNorms of the channel MLP and of the spatial convs",
    "cbam": "the channel max of the channel-gated map: the bf16 gate moves the argmax",
    "gam": "ReLU after the channel MLP and after BatchNorm in the spatial branch",
    "ham": "per-group channel max and ReLU before the sigmoid",
    "sk": "ReLU after each branch's BatchNorm and in the selection MLP",
    "splat": "ReLU after the BatchNorms of the splits and of the attention MLP",
    "triplet": "the max over C, H or W of its Z-pools: bf16 rounding moves the argmax",
}


def _run(module: nn.Module, x: torch.Tensor, extra: tuple, grad: torch.Tensor, autocast: bool):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = module(x, *extra)
    out.float().backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_autocast_matches_float32(
    name: str, device: torch.device, zero_gradients: Callable
) -> None:
    """Forward and backward under bf16 autocast against the same module in float32.

    Tolerances, as relative Frobenius errors ``||bf16 - fp32|| / ||fp32||``:
    - output: 2e-2. bf16 keeps 8 significant bits, so rounding an operand costs up to
      2^-8 = 3.9e-3 of it (half that on average); autocast rounds the inputs of every
      conv / matmul (they accumulate in float32) and their outputs, and a module chains 3
      to 5 of them: ~1e-2 at worst (measured over 30 seeds: 1e-3 to 5.5e-3). The modules
      with nothing to autocast (SimAM, SRM, GCT, ...) match exactly.
    - input gradient and the parameter gradients (all of them as one vector, leaving out
      those that are zero by construction, conftest.ZERO_GRADIENT_BY_CONSTRUCTION): 5e-2.
      Backward chains about twice the rounded ops of forward and multiplies them by gate
      and softmax derivatives (measured: up to 2.5e-2).
    - 0.3 for the gradients of the ``KINKED`` modules: where bf16 moves a value across a
      kink (ReLU, max), the gradient there switches on or off or moves to another channel,
      an O(1) change at a few entries (measured: up to 0.19, GAM).
    Skipping a module's work gives an output error of at least 0.13 (checked against three
    times the forward tolerance) and a parameter gradient error of 1.

    The comparison runs in eval mode: in training mode a BatchNorm over a batch of four
    pooled descriptors (SK, splat, BAM) divides by their spread across the batch, tiny for
    i.i.d. test inputs, which amplifies bf16 rounding (up to 0.7 gradient error): a property
    of that data, not of the module. Training mode under autocast is covered by
    test_registry_contract.py (finite outputs and gradients). The loss is ||out||^2 / 2, not
    a random projection: with random weights a scalar parameter's gradient (DANet's beta)
    is a sum of terms of random sign that cancels to a small value, against which bf16's
    rounding, which does not cancel with it, looks large (0.1).
    """
    module32 = build(name, device, train=False)
    module16 = copy.deepcopy(module32)
    torch.manual_seed(1)
    x = torch.randn(4, CHANNELS, 8, 8, device=device)
    extra = extra_inputs(name, 4, device)
    with torch.no_grad():
        grad = module32(x, *extra)  # d(||out||^2 / 2) / d out
    out32, grad_x32 = _run(module32, x, extra, grad, autocast=False)
    out16, grad_x16 = _run(module16, x, extra, grad, autocast=True)

    assert relative_error(x, out32) > 3 * FORWARD_TOLERANCE  # the module does work
    forward = relative_error(out16, out32)
    assert forward < FORWARD_TOLERANCE, f"{name}: output error {forward:.3g}"
    tolerance = KINK_GRADIENT_TOLERANCE if name in KINKED else GRADIENT_TOLERANCE
    assert grad_x16.dtype == x.dtype
    input_grad = relative_error(grad_x16, grad_x32)
    assert input_grad < tolerance, f"{name}: input gradient error {input_grad:.3g}"
    zero = zero_gradients(name, False)
    pairs = [
        (p16.grad, p32.grad, param_name)
        for (param_name, p32), p16 in zip(
            module32.named_parameters(), module16.parameters(), strict=True
        )
        if param_name not in zero
    ]
    for got, _, param_name in pairs:
        assert got is not None and got.dtype == torch.float32, f"{name}.{param_name}"
    if pairs:
        got = torch.cat([g.flatten() for g, _, _ in pairs])
        want = torch.cat([w.flatten() for _, w, _ in pairs])
        assert want.abs().max() > 0, f"{name}: no parameter gradient to compare"
        param_grad = relative_error(got, want)
        assert param_grad < tolerance, f"{name}: parameter gradient error {param_grad:.3g}"


# --- 4. the fused gate nodes under autocast ----------------------------------------------

FUSED = [
    ("se", {}),
    ("eca", {}),
    ("cbam", {"adaptive": True}),
    ("ham", {}),
    ("ham", {"spatial": "cbam"}),
    ("triplet", {}),
]


@pytest.mark.parametrize(("name", "kwargs"), FUSED, ids=[f"{n}-{kw}" for n, kw in FUSED])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [8, 20])  # 20 x 20: CBAM's banded gate conv on the CPU
def test_fused_gates_under_autocast(
    name: str, kwargs: dict, x_dtype: torch.dtype, size: int, device: torch.device
) -> None:
    """Fused against plain under bf16 autocast, with a float32 input (the first layer of an
    autocast network) and a bf16 one (any later layer): the same output and input-gradient
    dtypes, float32 gradients for the float32 parameters, values within the bf16 tolerances
    above (both paths round, at different places)."""
    torch.manual_seed(0)
    fused = create_attention(name, CHANNELS, **kwargs)
    fused = randomize_(fused).train().to(device)
    plain = copy.deepcopy(fused)
    x = torch.randn(4, CHANNELS, size, size, device=device).to(x_dtype)
    grad = torch.randn_like(x)
    results = []
    for module, context in ((fused, torch.enable_grad), (plain, plain_gates)):
        xx = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16), context():
            out = module(xx)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), xx.grad, [p.grad for p in module.parameters()]))
    (out, grad_x, params), (plain_out, plain_grad_x, plain_params) = results
    assert out.dtype == plain_out.dtype == torch.promote_types(x_dtype, torch.bfloat16)
    assert grad_x.dtype == plain_grad_x.dtype == x_dtype
    assert all(g.dtype == torch.float32 for g in params + plain_params)
    assert relative_error(out, plain_out) < FORWARD_TOLERANCE
    tolerance = KINK_GRADIENT_TOLERANCE if name in KINKED else GRADIENT_TOLERANCE
    assert relative_error(grad_x, plain_grad_x) < tolerance
    flat = torch.cat([g.flatten() for g in params])
    assert relative_error(flat, torch.cat([g.flatten() for g in plain_params])) < tolerance
