"""Shared helpers for the attention tests: random weights, a by-hand BatchNorm, and the
gradient check that knows which parameters get no gradient by construction."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from attnzoo.utils.random_weights import randomize_

_randomize = randomize_


def _batch_norm_by_hand(
    maps: torch.Tensor, bn: nn.BatchNorm2d, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN of a one-channel stack ``maps`` (M, 1, H, W) with the module's affine and eps.

    Returns (normalised maps, mean, unbiased variance). In training mode the statistics are
    the batch's, over all M*H*W values (the biased variance normalises, the unbiased one is
    what BN folds into its running estimate); in eval mode they are the running stats.
    """
    assert maps.shape[1] == 1
    values = maps.flatten()
    if training:
        mean = values.sum() / values.numel()
        var = ((values - mean) ** 2).sum() / values.numel()
        unbiased = ((values - mean) ** 2).sum() / (values.numel() - 1)
    else:
        mean = bn.running_mean.detach().double()[0]
        var = bn.running_var.detach().double()[0]
        unbiased = var
    gamma = bn.weight.detach().double()[0]
    beta = bn.bias.detach().double()[0]
    return (maps - mean) / torch.sqrt(var + bn.eps) * gamma + beta, mean, unbiased


@pytest.fixture
def randomize() -> Callable[[nn.Module], nn.Module]:
    return _randomize


@pytest.fixture
def batch_norm_by_hand() -> Callable:
    return _batch_norm_by_hand


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one intra-op thread: these tensors are tiny, so fanning out to threads costs more
    than it saves (several times over when other jobs share the CPU). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Parameters whose gradient is exactly zero in exact arithmetic, whatever the weights and the
# input. Computed, their gradient is rounding noise, zero or not depending on the CPU's kernels
# (AVX-512 vs AVX2), so a test may only expect it to be near zero:
# - a bias on the keys of a softmax attention adds q_u . b to every energy of query u, a
#   constant along the softmax's axis, which the softmax ignores;
# - in training mode, a bias right before a BatchNorm is removed again by the batch mean.
ZERO_GRADIENT_BY_CONSTRUCTION: dict[str, dict[str, str]] = {
    "danet_pam": {"key.bias": "the softmax over keys ignores a per-query constant"},
    "csm": {"spatial.key.bias": "its position attention is DANet's: as danet_pam"},
    "rcca": {"key.bias": "one joint softmax over the criss-cross keys: as danet_pam"},
    "bam": {
        "channel_mlp.0.bias": "train mode: the BatchNorm1d after it subtracts it again",
        **{
            f"spatial.{i}.bias": "train mode: the BatchNorm2d after it subtracts it again"
            for i in (0, 3, 6)
        },
    },
    "coord": {"conv1.bias": "train mode: the BatchNorm2d after it subtracts it again"},
    "splat": {"fc1.bias": "train mode: the BatchNorm1d after it subtracts it again"},
    "gam": {
        "spatial_conv1.bias": "train mode: the BatchNorm2d after it subtracts it again",
        "spatial_conv2.bias": "train mode: the BatchNorm2d after it subtracts it again",
    },
    "gc": {"context_conv.bias": "the softmax over positions ignores a constant on every logit"},
    "a2": {"gather_conv.bias": "each map's softmax over positions ignores a constant on it"},
    "nonlocal": {
        "phi.bias": "the softmax over keys ignores a per-query constant",
        "g.bias": "train mode: a constant after the softmax average; the BatchNorm2d removes it",
        "out_conv.bias": "train mode: the BatchNorm2d after it subtracts it again",
    },
}
# Checked in float64, where that noise is ~1e-16 of the largest gradient and the smallest real
# gradient seen is ~1e-4 of it: below NEAR_ZERO a gradient is zero, above REAL it is real.
NEAR_ZERO = 1e-10
REAL = 1e-7


TRAIN_MODE_ONLY = "train mode:"  # reasons that start so hold only while BN uses batch stats


def expected_zero_gradients(name: str, training: bool) -> dict[str, str]:
    """The parameters of attention ``name`` whose gradient is zero by construction."""
    listed = ZERO_GRADIENT_BY_CONSTRUCTION.get(name, {})
    return {p: why for p, why in listed.items() if training or not why.startswith(TRAIN_MODE_ONLY)}


def _assert_gradients(module: nn.Module, name: str, zero: dict[str, str] | None = None) -> None:
    """Every parameter got a finite gradient; those that are zero by construction (``zero``,
    default ``expected_zero_gradients(name, module.training)``) are near zero, every other one
    is clearly above rounding noise. The module must have run in float64."""
    expected_zero = expected_zero_gradients(name, module.training) if zero is None else zero
    dtypes = {p.dtype for p in module.parameters()}
    assert dtypes <= {torch.float64}, f"check gradients in float64, not {dtypes}"
    grads = {}
    for param_name, param in module.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name}: gradient not finite"
        grads[param_name] = param.grad.abs().max().item()
    assert set(expected_zero) <= set(grads), f"{name}: listed {set(expected_zero) - set(grads)}"
    largest = max(grads.values(), default=0.0)
    assert largest > 0 or not grads, f"{name}: every parameter gradient is zero"
    wrong = []
    for param_name, g in grads.items():
        if param_name in expected_zero and g > NEAR_ZERO * largest:
            wrong.append(f"{param_name} ({expected_zero[param_name]}) is not zero: {g:.3g}")
        elif param_name not in expected_zero and g < REAL * largest:
            wrong.append(f"{param_name} is at rounding-noise level: {g:.3g}")
    assert not wrong, f"{name} (largest gradient {largest:.3g}): " + "; ".join(wrong)


@pytest.fixture
def assert_gradients() -> Callable[..., None]:
    return _assert_gradients


@pytest.fixture
def zero_gradients() -> Callable[[str, bool], dict[str, str]]:
    return expected_zero_gradients


def _losses_in_resnet20(attention: str, steps: int = 4, **attention_kwargs) -> list[float]:
    """Losses of ``steps`` SGD steps of a resnet20 with ``attention`` on one fixed batch of
    16 x 16 images: a module that trains makes the last loss lower than the first."""
    import attnzoo

    torch.manual_seed(0)
    model = attnzoo.create_model(
        "resnet20", attention=attention, attention_kwargs=attention_kwargs
    ).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def losses_in_resnet20() -> Callable[..., list[float]]:
    return _losses_in_resnet20
