"""The fused gate nodes (``layers.pooled_gate``, HAM's separated spatial gate) against the
plain autograd expressions they replace: outputs, input and parameter gradients and BN
running statistics, in float64; plus finite-difference checks of the hand-written backward.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from attnzoo.attention.layers import BANDED_MIN_POSITIONS, _GateConv2d, gate_conv2d, plain_gates
from attnzoo.registry import create_attention

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


def run(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    params = [p.grad.clone() for p in module.parameters()]
    return out.detach(), x.grad, params, [b.clone() for b in module.buffers()]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "sign"), [((3, 16, 7, 5), "mixed"), ((2, 32, 8, 8), "negative")])
def test_fused_equals_plain(
    name: str, kwargs: dict, channels_last: bool, shape: tuple, sign: str, randomize
) -> None:
    """All-negative inputs: every HAM group max is a zero of the other group (no gradient)."""
    torch.manual_seed(0)
    fused = randomize(create_attention(name, shape[1], **kwargs)).double().train()
    plain = copy.deepcopy(fused)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.3
    x = -x.abs() if sign == "negative" else x
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    got = run(fused, x, grad)
    with plain_gates():
        want = run(plain, x, grad)
    for a, b in zip(got, want, strict=True):
        if isinstance(a, list):
            for u, v in zip(a, b, strict=True):
                torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[1].is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    ), "the input gradient keeps the input's layout"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [c for c in CASES if c[0] != "ham"],
    ids=[i for (n, _), i in zip(CASES, IDS, strict=True) if n != "ham"],
)
def test_gradcheck(name: str, kwargs: dict, randomize) -> None:
    """Finite differences in float64 (eval mode: BN with fixed statistics)."""
    torch.manual_seed(0)
    module = randomize(create_attention(name, 16, **kwargs)).double().eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"spatial": "cbam"}])
def test_gradcheck_ham(kwargs: dict, randomize) -> None:
    """HAM's channel separation is piecewise constant in x: finite differences hold while no
    perturbation reorders the channel weights, which these well-separated weights ensure."""
    torch.manual_seed(0)
    module = randomize(create_attention("ham", 16, **kwargs)).double().eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-7, atol=1e-5)


def test_plain_path_without_grad() -> None:
    """Under no_grad the plain expression runs (no autograd node), with the same values."""
    torch.manual_seed(0)
    module = create_attention("cbam", 16).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        a = module(x)
    b = module(x.requires_grad_())
    assert a.grad_fn is None and b.grad_fn is not None
    torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize(
    ("channels", "k", "size"), [(2, 7, (16, 16)), (1, 3, (16, 20)), (2, 5, (32, 8))]
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_banded_gate_conv_equals_conv2d(
    channels: int, k: int, size: tuple, channels_last: bool
) -> None:
    """Maps of >= BANDED_MIN_POSITIONS positions take the banded-matmul conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 1, k, padding=k // 2, bias=False).double()
    x = torch.randn(3, channels, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert size[0] * size[1] >= BANDED_MIN_POSITIONS
    grad = torch.randn(3, 1, *size, dtype=torch.float64)
    results = []
    for fused in (True, False):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        with contextlib.nullcontext() if fused else plain_gates():
            out = gate_conv2d(xi, conv)
        assert ("_GateConv2d" in type(out.grad_fn).__name__) is fused
        out.backward(grad)
        results.append((out.detach(), xi.grad, conv.weight.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda a, w: _GateConv2d.apply(a, w),
        (x[:1].clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()),
    )


def test_spatial_gates_at_large_maps_equal_plain(randomize) -> None:
    """CBAM, HAM and triplet at 16 x 16 (the banded conv) against the plain expressions."""
    for name in ("cbam", "ham", "triplet"):
        torch.manual_seed(0)
        fused = randomize(create_attention(name, 16)).double().train()
        plain = copy.deepcopy(fused)
        x = torch.randn(2, 16, 16, 16, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        grad = torch.randn_like(x)
        got = run(fused, x, grad)
        with plain_gates():
            want = run(plain, x, grad)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
        for u, v in zip(got[2], want[2], strict=True):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
