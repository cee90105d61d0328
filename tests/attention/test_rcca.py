"""RCCA against CCNet Eqs. 1-2, pixel by pixel over each criss-cross path, and its options."""

from __future__ import annotations

import copy

import pytest
import torch

import attnzoo
from attnzoo.attention.rcca import RecurrentCrissCrossAttention
from attnzoo.registry import create_attention

GAMMA = 0.7


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_gamma(module: RecurrentCrissCrossAttention, value: float = GAMMA):
    with torch.no_grad():
        module.gamma.fill_(value)
    return module


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of one sample x (C_in, H, W) as a per-pixel matrix product, in float64."""
    weight = conv.weight.detach().double().flatten(1)
    return torch.einsum("oc,chw->ohw", weight, x) + conv.bias.detach().double()[:, None, None]


def criss_cross_path(y: int, x: int, height: int, width: int, self_twice: bool = False):
    """u's column then its row; u itself once (h + w - 1 positions), or twice if asked."""
    column = [(g, x) for g in range(height)]
    row = [(y, v) for v in range(width) if self_twice or v != x]
    return column + row


def one_pass(
    x: torch.Tensor, module: RecurrentCrissCrossAttention, self_twice: bool = False
) -> torch.Tensor:
    """H'_u = gamma sum_i A_{i,u} Phi_{i,u} + H_u (Eqs. 1-2), one pixel at a time, float64."""
    n_batch, _, height, width = x.shape
    gamma = module.gamma.detach().double()
    out = torch.empty_like(x)
    for n in range(n_batch):
        q, k, v = (conv1x1(conv, x[n]) for conv in (module.query, module.key, module.value))
        for y in range(height):
            for x_ in range(width):
                path = criss_cross_path(y, x_, height, width, self_twice)
                omega = torch.stack([k[:, g, h] for g, h in path])  # (|path|, C')
                phi = torch.stack([v[:, g, h] for g, h in path])  # (|path|, C)
                d = omega @ q[:, y, x_]  # Eq. 1: d_{i,u} = Q_u . Omega_{i,u}
                a = torch.exp(d - d.max())
                a = a / a.sum()  # one softmax over the whole path
                out[n, :, y, x_] = gamma * (a @ phi) + x[n, :, y, x_]  # Eq. 2
    return out


def rcca_reference(x: torch.Tensor, module: RecurrentCrissCrossAttention) -> torch.Tensor:
    out = x.double()
    for _ in range(module.recurrence):
        out = one_pass(out, module)
    return out


SIZES = [(1, 1, 1), (2, 6, 5), (1, 7, 5), (2, 1, 4), (1, 5, 1)]


@pytest.mark.parametrize("channels", [16, 32])
@pytest.mark.parametrize("recurrence", [1, 2, 3])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference(
    channels: int, recurrence: int, size: tuple[int, int, int], mode: str, randomize
) -> None:
    torch.manual_seed(0)
    module = RecurrentCrissCrossAttention(channels, recurrence=recurrence)
    module = with_gamma(randomize(module)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:])
    expected = rcca_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_pixel_is_counted_once(randomize) -> None:
    """Counting u twice (no -inf mask) gives a different result."""
    torch.manual_seed(0)
    module = with_gamma(randomize(RecurrentCrissCrossAttention(16, recurrence=1)))
    x = torch.randn(2, 16, 6, 5)
    out = module(x).double()
    torch.testing.assert_close(out, one_pass(x.double(), module), atol=1e-5, rtol=1e-5)
    twice = one_pass(x.double(), module, self_twice=True)
    assert not torch.allclose(out, twice, atol=1e-3)


def test_recurrence_shares_weights(randomize) -> None:
    """R = 2 is the R = 1 module applied twice; R does not change the parameter count."""
    torch.manual_seed(0)
    twice = with_gamma(randomize(RecurrentCrissCrossAttention(16, recurrence=2)))
    once = RecurrentCrissCrossAttention(16, recurrence=1)
    once.load_state_dict(twice.state_dict())
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(twice(x), once(once(x)), atol=1e-6, rtol=1e-6)
    assert n_params(twice) == n_params(once)
    assert not torch.allclose(twice(x), once(x), atol=1e-3)


def test_two_passes_reach_every_pixel(randomize) -> None:
    """After one pass u sees its row and column only; after two it sees the whole map."""
    torch.manual_seed(0)
    module = with_gamma(randomize(RecurrentCrissCrossAttention(16, recurrence=1)))
    x = torch.randn(1, 16, 6, 5, requires_grad=True)
    out = module(x)
    (grad,) = torch.autograd.grad(out[0, :, 0, 0].sum(), x)
    reached = grad.abs().sum(dim=1)[0] > 0
    assert reached[0].all() and reached[:, 0].all() and not reached[1:, 1:].any()
    module.recurrence = 2
    (grad,) = torch.autograd.grad(module(x)[0, :, 0, 0].sum(), x)
    assert (grad.abs().sum(dim=1)[0] > 0).all()


def test_starts_as_identity() -> None:
    torch.manual_seed(0)
    module = create_attention("rcca", 16)
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(module(x), x)


@pytest.mark.parametrize("size", [(1, 1, 1), (1, 7, 5), (3, 7, 5), (3, 6, 5)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shapes(size: tuple[int, int, int], mode: str) -> None:
    torch.manual_seed(0)
    module = with_gamma(create_attention("rcca", 16)).train(mode == "train")
    x = torch.randn(size[0], 16, *size[1:])
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter(randomize, assert_gradients) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention("rcca", 16))).double()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    assert_gradients(module, "rcca")  # all but the key bias, which the softmax cancels
    assert x.grad.abs().sum() > 0


def test_gamma_gets_gradient_at_zero_init() -> None:
    torch.manual_seed(0)
    module = create_attention("rcca", 16)
    assert module.gamma.item() == 0.0 and module.gamma.dim() == 0
    out = module(torch.randn(2, 16, 6, 5))
    (out * torch.randn_like(out)).sum().backward()
    assert module.gamma.grad.abs() > 0


def test_bfloat16_autocast(randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention("rcca", 16)))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)


def test_channels_last_matches_contiguous(randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention("rcca", 16)))
    x = torch.randn(3, 16, 7, 5)
    out_last = copy.deepcopy(module)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        # 2 * (C*C' + C') for Q and K, C*C + C for V, 1 for gamma; R shares them
        (16, {}, 2 * (16 * 2 + 2) + 16 * 16 + 16 + 1),  # 341
        (32, {}, 2 * (32 * 4 + 4) + 32 * 32 + 32 + 1),  # 1321
        (64, {}, 2 * (64 * 8 + 8) + 64 * 64 + 64 + 1),  # 5201
        (64, {"recurrence": 1}, 5201),
        (64, {"recurrence": 3}, 5201),
        (64, {"reduction": 2}, 2 * (64 * 32 + 32) + 64 * 64 + 64 + 1),  # 8321
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    assert n_params(create_attention("rcca", channels, **kwargs)) == expected


def test_default_recurrence_is_two() -> None:
    assert create_attention("rcca", 16).recurrence == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recurrence": 0},
        {"recurrence": -1},
        {"recurrence": 1.5},
        {"recurrence": 2.0},
        {"recurrence": True},
        {"recurrence": "2"},
        {"reduction": 0},
    ],
)
def test_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_attention("rcca", 16, **kwargs)


def test_resnet20_trains_three_steps() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="rcca").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 9 and all(p.item() != 0.0 for p in gammas)
