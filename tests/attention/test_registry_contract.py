"""The contract every registered attention module meets.

Parametrised over ``attnzoo.list_attentions()``, so a newly registered module is covered
without editing this file.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.registry import attention_class, create_attention

NAMES = attnzoo.list_attentions(level=("module", "block", "conv"))  # model-level: tests/models
CHANNELS = (16, 32)
# (N, H, W) and the mode to run in; odd sizes on purpose. A single value per channel
# (batch 1 at 1x1) runs in eval mode: BatchNorm cannot take batch statistics of one value.
SIZES = [
    ((1, 1, 1), "eval"),
    ((2, 1, 1), "train"),
    ((1, 7, 5), "train"),
    ((3, 7, 5), "train"),
    ((2, 8, 8), "train"),
]
SHAPE_IDS = [f"n{n}-{h}x{w}" for (n, h, w), _ in SIZES]
SIZE_IDS = [f"{shape}-{mode}" for shape, (_, mode) in zip(SHAPE_IDS, SIZES, strict=True)]


def test_registry_is_not_empty() -> None:
    assert {"se", "eca", "cbam", "ham"} <= set(NAMES)
    assert NAMES == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize(("size", "mode"), SIZES, ids=SIZE_IDS)
def test_output_shape_equals_input_shape(
    name: str, channels: int, size: tuple[int, int, int], mode: str
) -> None:
    torch.manual_seed(0)
    n, h, w = size
    module = create_attention(name, channels).train(mode == "train")
    x = torch.randn(n, channels, h, w)
    out = module(x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", [s for s, _ in SIZES], ids=SHAPE_IDS)
def test_output_shape_in_eval_mode(name: str, channels: int, size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels).eval()
    x = torch.randn(size[0], channels, *size[1:])
    with torch.no_grad():
        out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("size", [(3, 7, 5), (2, 8, 8)])
@pytest.mark.parametrize("weights", ["init", "random"])
def test_gradients_reach_every_parameter(
    name: str, channels: int, size: tuple[int, int, int], weights: str, randomize, assert_gradients
) -> None:
    """Every parameter gets a finite gradient; with random weights, a real one.

    At init some modules legitimately pass no gradient to part of their weights: a gate
    initialised to zero (DANet's gamma, for example) hides the branch behind it until it
    moves. Random weights open such gates, so there every gradient must be clearly above
    rounding noise, except the few that are zero by construction (a key bias under a softmax;
    conftest.ZERO_GRADIENT_BY_CONSTRUCTION), which must be near zero.
    """
    torch.manual_seed(0)
    module = create_attention(name, channels).train()
    if weights == "random":
        randomize(module)
        with torch.no_grad():  # positive biases keep 1-unit hidden layers (C=16, r=16) alive
            for param_name, param in module.named_parameters():
                if param_name.endswith("bias"):
                    param.abs_()
    # float64: in float32, a gradient that is zero by construction comes out as rounding
    # noise, which only a float64 run keeps 1e9 below the real ones.
    module = module.double()
    x = torch.randn(size[0], channels, *size[1:], dtype=torch.float64, requires_grad=True)
    out = module(x)
    # A random projection, so no gradient cancels by symmetry (as out.sum() can after BN).
    (out * torch.randn_like(out)).sum().backward()
    params = dict(module.named_parameters())  # may be empty (parameter-free attention)
    for param_name, param in params.items():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name} gradient not finite"
    assert not params or any(p.grad.abs().max() > 0 for p in params.values()), (
        f"{name}: every parameter gradient is zero"
    )
    if weights == "random":
        assert_gradients(module, name)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_works_under_bfloat16_autocast(name: str, channels: int, mode: str) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels).train(mode == "train")
    x = torch.randn(2, channels, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    out.float().sum().backward()
    for param_name, param in module.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient under autocast"
        assert torch.isfinite(param.grad).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_matches_contiguous(name: str, channels: int, mode: str) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels).train(mode == "train")
    twin = copy.deepcopy(module)  # train mode updates BN running stats: one copy per call
    x = torch.randn(3, channels, 7, 5)
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert x_last.is_contiguous(memory_format=torch.channels_last)
    out = module(x)
    out_last = twin(x_last)
    assert out_last.shape == x.shape
    torch.testing.assert_close(out_last.contiguous(), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_eval_mode_treats_samples_independently(name: str, channels: int) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels).eval()
    x = torch.randn(4, channels, 7, 5)
    with torch.no_grad():
        batched = module(x)
        one_by_one = torch.cat([module(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_wrong_channel_count_raises(name: str, channels: int) -> None:
    torch.manual_seed(0)
    module = create_attention(name, channels)
    for wrong in (channels - 1, channels + 1, 2 * channels):
        with pytest.raises(ValueError, match=str(channels)):
            module(torch.randn(2, wrong, 5, 5))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(16, 5, 5), (2, 16, 5), (2, 16, 5, 5, 1)])
def test_input_that_is_not_4d_raises(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    module = create_attention(name, 16)
    with pytest.raises(ValueError, match="expects input"):
        module(torch.randn(*shape))


@pytest.mark.parametrize("bad_name", ["hamm", "SE", "no_such_attention", ""])
def test_unknown_attention_name_lists_valid_names(bad_name: str) -> None:
    with pytest.raises(ValueError, match="unknown attention") as excinfo:
        create_attention(bad_name, 16)
    for name in NAMES:
        assert name in str(excinfo.value)


@pytest.mark.parametrize("bad_name", [None, 3])
def test_non_string_attention_name_raises(bad_name: object) -> None:
    with pytest.raises(ValueError, match="unknown attention"):
        create_attention(bad_name, 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises(name: str) -> None:
    with pytest.raises(ValueError, match="not_an_option") as excinfo:
        create_attention(name, 16, not_an_option=1)
    assert "valid options" in str(excinfo.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [0, -4, 16.0, True, "16"])
def test_bad_channel_count_raises(name: str, channels: object) -> None:
    with pytest.raises(ValueError, match="channels"):
        create_attention(name, channels)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_channels_is_first_positional_parameter(name: str) -> None:
    cls = attention_class(name)
    if inspect.isclass(cls):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    else:
        params = list(inspect.signature(cls).parameters.values())
    assert params, f"{name} takes no arguments"
    first = params[0]
    assert first.name == "channels"
    assert first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
    # create_attention(name, channels) alone must work: every other option has a default.
    for param in params[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        assert param.default is not param.empty, f"{name}: option {param.name} has no default"


@pytest.mark.parametrize("name", NAMES)
def test_create_attention_returns_the_registered_class(name: str) -> None:
    module = create_attention(name, 16)
    cls = attention_class(name)
    if inspect.isclass(cls):
        assert isinstance(module, cls)
    assert isinstance(module, nn.Module)
