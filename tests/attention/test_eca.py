"""EfficientChannelAttention against ECA's equations, its kernel-size rule and options."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.attention import EfficientChannelAttention
from attnzoo.attention.layers import eca_kernel_size
from attnzoo.registry import create_attention


def nearest_odd(t: float) -> int:
    """|t|_odd: the odd integer closest to t; at a tie (t even) the larger one."""
    below = 2 * math.floor((t - 1) / 2) + 1  # largest odd <= t
    above = below + 2
    return above if above - t <= t - below else below


def kernel_from_formula(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """HAM Eq. 6 / ECA Eq. 12: k = |log2(C)/gamma + b/gamma|_odd."""
    return nearest_odd(math.log2(channels) / gamma + b / gamma)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def eca_reference(x: torch.Tensor, module: EfficientChannelAttention) -> torch.Tensor:
    """GAP, then a zero-padded 1-D conv across channels written as an explicit loop."""
    x = x.double()
    n_batch, channels, height, width = x.shape
    weight = module.conv.weight.detach().double().flatten().tolist()  # k taps
    k = len(weight)
    out = torch.empty_like(x)
    for n in range(n_batch):
        y = [x[n, c].sum().item() / (height * width) for c in range(channels)]
        for c in range(channels):
            # Cross-correlation, as nn.Conv1d: tap j looks at channel c - k//2 + j.
            acc = 0.0
            for j in range(k):
                neighbour = c - k // 2 + j
                if 0 <= neighbour < channels:  # zero padding at both ends
                    acc += weight[j] * y[neighbour]
            out[n, c] = sigmoid(acc) * x[n, c]
    return out


@pytest.mark.parametrize("channels", [16, 32, 64, 128])
@pytest.mark.parametrize("kernel_size", [None, 1, 3, 5, 9])
@pytest.mark.parametrize("size", [(1, 1, 1), (2, 7, 5), (3, 4, 4)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference(
    channels: int, kernel_size: int | None, size: tuple[int, int, int], mode: str, randomize
) -> None:
    torch.manual_seed(0)
    module = EfficientChannelAttention(channels, kernel_size=kernel_size)
    module = randomize(module).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = eca_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_edge_channels_see_zero_padding() -> None:
    """With weights (1, 0, 0) channel c reads channel c-1; channel 0 reads the zero pad."""
    torch.manual_seed(0)
    module = EfficientChannelAttention(16, kernel_size=3)
    with torch.no_grad():
        module.conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 1, 3))
    x = torch.randn(2, 16, 3, 3)
    gap = x.mean(dim=(2, 3))
    gate = module.gate(x).view(2, 16)
    torch.testing.assert_close(gate[:, 0], torch.full((2,), 0.5))
    torch.testing.assert_close(gate[:, 1:], torch.sigmoid(gap[:, :-1]))


@pytest.mark.parametrize(
    ("channels", "k"),
    [
        (16, 3),
        (32, 3),
        (64, 3),
        (128, 5),
        (256, 5),
        (512, 5),
        (1024, 5),
        (2048, 7),
    ],
)
def test_kernel_size_table(channels: int, k: int) -> None:
    torch.manual_seed(0)
    assert kernel_from_formula(channels) == k
    assert eca_kernel_size(channels) == k
    module = create_attention("eca", channels)
    assert module.kernel_size == k
    assert module.conv.weight.shape == (1, 1, k)
    assert module.conv.bias is None
    assert sum(p.numel() for p in module.parameters()) == k


@pytest.mark.parametrize(
    "channels", [1, 2, 3, 8, 24, 48, 96, 100, 127, 128, 129, 300, 2047, 2048, 4096, 8192]
)
@pytest.mark.parametrize(("gamma", "b"), [(2.0, 1.0), (1.0, 1.0), (2.0, 3.0), (3.0, 0.0)])
def test_kernel_size_follows_formula(channels: int, gamma: float, b: float) -> None:
    assert eca_kernel_size(channels, gamma, b) == kernel_from_formula(channels, gamma, b)
    module = EfficientChannelAttention(channels, gamma=gamma, b=b)
    assert module.kernel_size == kernel_from_formula(channels, gamma, b)


@pytest.mark.parametrize("channels", [8, 128, 2048])
def test_kernel_size_tie_rounds_up(channels: int) -> None:
    """(log2 C + 1) / 2 is an even integer (2, 4, 6) for these C: the tie goes up."""
    t = (math.log2(channels) + 1) / 2
    assert t == int(t) and int(t) % 2 == 0
    assert eca_kernel_size(channels) == int(t) + 1


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9, 15])
@pytest.mark.parametrize("channels", [16, 2048])
def test_fixed_kernel_size(kernel_size: int, channels: int) -> None:
    torch.manual_seed(0)
    module = EfficientChannelAttention(channels, kernel_size=kernel_size)
    assert module.kernel_size == kernel_size
    assert module.conv.weight.shape == (1, 1, kernel_size)
    assert sum(p.numel() for p in module.parameters()) == kernel_size
    x = torch.randn(2, channels, 3, 3)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("kernel_size", [2, 4, 8, 0, -1, -3, 3.0])
def test_bad_kernel_size_raises(kernel_size: float) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        EfficientChannelAttention(64, kernel_size=kernel_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel_size"):
        create_attention("eca", 64, kernel_size=kernel_size)


def test_gamma_must_be_positive() -> None:
    with pytest.raises(ValueError, match="gamma"):
        EfficientChannelAttention(64, gamma=0.0)
