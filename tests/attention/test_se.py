"""SqueezeExcite against Hu et al. Eqs. 2-4, its hidden-width rules and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention import SqueezeExcite
from attnzoo.registry import create_attention

RESNET20_PARAMS = 269_722


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def se_reference(x: torch.Tensor, module: SqueezeExcite) -> torch.Tensor:
    """Hu et al. Eqs. 2-4, one sample and one channel at a time, in float64."""
    x = x.double()
    n_batch, channels, height, width = x.shape
    w1 = module.fc1.weight.detach().double().reshape(-1, channels).tolist()  # (hidden, C)
    b1 = module.fc1.bias.detach().double().tolist()
    w2 = module.fc2.weight.detach().double().reshape(channels, -1).tolist()  # (C, hidden)
    b2 = module.fc2.bias.detach().double().tolist()
    hidden = len(w1)
    out = torch.empty_like(x)
    for n in range(n_batch):
        # Eq. 2, squeeze: z_c = 1/(H W) sum_ij u_c(i, j)
        z = [x[n, c].sum().item() / (height * width) for c in range(channels)]
        # Eq. 3, excitation: s = sigmoid(W2 relu(W1 z))
        h = [max(0.0, sum(w1[j][c] * z[c] for c in range(channels)) + b1[j]) for j in range(hidden)]
        s = [sigmoid(sum(w2[c][j] * h[j] for j in range(hidden)) + b2[c]) for c in range(channels)]
        # Eq. 4, scale
        for c in range(channels):
            out[n, c] = s[c] * x[n, c]
    return out


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("rd_rule", ["floor", "round8"])
@pytest.mark.parametrize("size", [(1, 1, 1), (2, 7, 5), (3, 4, 4)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference(
    channels: int, rd_rule: str, size: tuple[int, int, int], mode: str, randomize
) -> None:
    torch.manual_seed(0)
    module = randomize(SqueezeExcite(channels, rd_rule=rd_rule)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = se_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "reduction", "rd_rule", "hidden"),
    [
        (64, 16, "floor", 4),
        (64, 16, "round8", 8),
        (32, 16, "floor", 2),
        (16, 16, "floor", 1),
        (8, 16, "floor", 1),  # C // r = 0, kept at 1
        (8, 16, "round8", 8),  # round8 never goes below 8
        (100, 16, "floor", 6),  # 6.25 -> 6
        (100, 16, "round8", 8),  # 6.25 -> nearest multiple of 8
        (160, 16, "round8", 8),  # 10 -> 8
        (192, 16, "round8", 16),  # 12 is halfway between 8 and 16: rounds up
        (200, 16, "floor", 12),
        (200, 16, "round8", 16),
        (256, 16, "floor", 16),
        (256, 16, "round8", 16),
        (64, 4, "floor", 16),
        (64, 8.0, "floor", 8),
        (96, 4, "round8", 24),
    ],
)
def test_hidden_width_rule(channels: int, reduction: float, rd_rule: str, hidden: int) -> None:
    torch.manual_seed(0)
    module = SqueezeExcite(channels, reduction=reduction, rd_rule=rd_rule)
    assert module.fc1.in_channels == channels
    assert module.fc1.out_channels == hidden
    assert module.fc2.in_channels == hidden
    assert module.fc2.out_channels == channels


@pytest.mark.parametrize("rd_rule", ["floor", "round8"])
@pytest.mark.parametrize("rd_channels", [1, 5, 64])
def test_explicit_rd_channels_overrides_rule(rd_rule: str, rd_channels: int) -> None:
    torch.manual_seed(0)
    module = SqueezeExcite(64, rd_rule=rd_rule, rd_channels=rd_channels)
    assert module.fc1.out_channels == rd_channels
    assert n_params(module) == 64 * rd_channels + rd_channels + rd_channels * 64 + 64


def test_default_rule_is_floor() -> None:
    assert SqueezeExcite(64).fc1.out_channels == 4
    assert create_attention("se", 64).fc1.out_channels == 4


@pytest.mark.parametrize(
    ("channels", "rd_rule", "expected"),
    [
        # C*h (W1) + h (b1) + h*C (W2) + C (b2)
        (64, "floor", 64 * 4 + 4 + 4 * 64 + 64),  # 580
        (64, "round8", 64 * 8 + 8 + 8 * 64 + 64),  # 1096
        (32, "floor", 32 * 2 + 2 + 2 * 32 + 32),  # 162
        (32, "round8", 32 * 8 + 8 + 8 * 32 + 32),  # 552
        (16, "floor", 16 * 1 + 1 + 1 * 16 + 16),  # 49
        (16, "round8", 16 * 8 + 8 + 8 * 16 + 16),  # 280
        (512, "floor", 512 * 32 + 32 + 32 * 512 + 512),  # 33,312
    ],
)
def test_parameter_count(channels: int, rd_rule: str, expected: int) -> None:
    torch.manual_seed(0)
    assert n_params(SqueezeExcite(channels, rd_rule=rd_rule)) == expected


def test_parameter_count_literal() -> None:
    assert n_params(SqueezeExcite(64)) == 580


@pytest.mark.parametrize(
    ("attention_kwargs", "delta"),
    [
        (None, 2_373),  # 3 blocks at each of 16, 32, 64 channels: 3 * (49 + 162 + 580)
        ({"rd_rule": "floor"}, 2_373),
        ({"rd_rule": "round8"}, 5_784),  # 3 * (280 + 552 + 1096)
    ],
)
def test_resnet20_parameter_delta(attention_kwargs: dict | None, delta: int) -> None:
    torch.manual_seed(0)
    assert n_params(attnzoo.create_model("resnet20")) == RESNET20_PARAMS
    model = attnzoo.create_model("resnet20", attention="se", attention_kwargs=attention_kwargs)
    assert n_params(model) == RESNET20_PARAMS + delta


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rd_rule": "ceil"},
        {"reduction": 0},
        {"reduction": -4},
        {"rd_channels": 0},
    ],
)
def test_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SqueezeExcite(64, **kwargs)


def test_gate_lies_in_unit_interval() -> None:
    torch.manual_seed(0)
    module = SqueezeExcite(32)
    gate = module.gate(torch.randn(3, 32, 5, 5) * 10)
    assert gate.shape == (3, 32, 1, 1)
    assert (gate > 0).all() and (gate < 1).all()
