"""Shuffle attention (attnzoo/attention/shuffle.py) against a float64 reference written from
SA-Net's equations, one sample, group and channel at a time, with the channel shuffle
written out as an index map."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention.shuffle import ShuffleAttention


def sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def reference(x: torch.Tensor, m: ShuffleAttention, shuffle: bool = True) -> torch.Tensor:
    n, c, h, w = x.shape
    groups = m.groups
    half = c // (2 * groups)
    p = {name: t.detach().double().tolist() for name, t in m.named_parameters()}
    aggregated = torch.empty_like(x)
    for i in range(n):
        for k in range(groups):
            first = k * 2 * half  # X_k starts here; X_k1 = its first C/2G channels
            for j in range(half):
                # channel branch: sigma(W_1 s + b_1) X_k1, s its spatial mean
                ch = first + j
                s = x[i, ch].sum() / (h * w)
                gate = sigmoid(p["channel_weight"][j] * s + p["channel_bias"][j])
                aggregated[i, ch] = gate * x[i, ch]
                # spatial branch: sigma(W_2 GN(X_k2) + b_2) X_k2, GN per channel
                ch = first + half + j
                values = x[i, ch]
                mean = values.sum() / (h * w)
                var = ((values - mean) ** 2).sum() / (h * w)
                normed = (values - mean) / math.sqrt(var.item() + 1e-5)
                normed = normed * p["norm_weight"][j] + p["norm_bias"][j]
                gate = sigmoid(p["spatial_weight"][j] * normed + p["spatial_bias"][j])
                aggregated[i, ch] = gate * values
    if not shuffle:
        return aggregated
    out = torch.empty_like(x)
    for t in range(2):  # channel shuffle, 2 groups: out[2j + t] = aggregated[t C/2 + j]
        for j in range(c // 2):
            out[:, 2 * j + t] = aggregated[:, t * (c // 2) + j]
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((2, 16, 7, 5), 64), ((1, 24, 3, 3), 2), ((2, 32, 1, 1), 4), ((3, 12, 4, 6), 3),
     ((1, 16, 7, 5), 1)],
)  # fmt: skip
def test_matches_the_equations(mode, shape, groups, randomize):
    torch.manual_seed(0)
    m = randomize(ShuffleAttention(shape[1], groups=groups)).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) + 0.3
    expected = reference(x, m)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # the shuffle moves channels: without it the result is far off
    assert (out - reference(x, m, shuffle=False)).abs().max() > 1e-2


def test_official_initialisation():
    m = ShuffleAttention(256).double()
    assert m.groups == 64
    x = torch.randn(2, 256, 5, 5, dtype=torch.float64)
    # W_1 = W_2 = 0, b_1 = b_2 = 1: every gate is sigmoid(1), then the shuffle
    gated = x * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    expected = gated.reshape(2, 2, 128, 5, 5).transpose(1, 2).reshape(2, 256, 5, 5)
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize(
    ("channels", "requested", "used"),
    [(2048, 64, 64), (256, 64, 64), (16, 64, 8), (32, 64, 16), (300, 64, 50), (342, 64, 57),
     (216, 64, 54), (24, 64, 12), (2, 64, 1), (12, 4, 3)],
)  # fmt: skip
def test_groups_fall_back_to_the_largest_divisor_of_half(channels, requested, used):
    m = ShuffleAttention(channels, groups=requested)
    assert m.groups == used and (channels // 2) % used == 0
    # W_1, b_1, W_2, b_2 and GN's scale and shift, each C/2G: 6 C/2G = 3 C/G
    assert sum(p.numel() for p in m.parameters()) == 3 * channels // used


def test_resnet50_parameters():
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="shuffle")
    # 3 C/G per block, G = 64: 3/64 (3*256 + 4*512 + 6*1024 + 3*2048) = 708 added. The
    # official README lists sa_resnet50 at 25.56M, as here; the paper's abstract says
    # "300 vs. 25.56M", fewer than its own code has.
    assert count_params(model) == 25_557_032 + 708
    assert round(count_params(model) / 1e6, 2) == 25.56


def test_bfloat16_input_keeps_float32_statistics(randomize):
    torch.manual_seed(0)
    m = randomize(ShuffleAttention(32, groups=4))
    x = (torch.randn(2, 32, 6, 6) * 3 + 1).bfloat16()
    halves = x.reshape(2, 4, 2, 4, 6, 6)
    gate = m.spatial_gate(halves[:, :, 1])
    assert gate.dtype == torch.float32 and m(x).dtype == torch.bfloat16
    exact = m.double().spatial_gate(halves[:, :, 1].double())
    torch.testing.assert_close(gate.double(), exact, rtol=1e-5, atol=1e-5)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("shuffle")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("groups", [0, -4, 2.0, True, "64", None])
def test_bad_groups(groups):
    with pytest.raises(ValueError, match="groups"):
        ShuffleAttention(16, groups=groups)


@pytest.mark.parametrize("channels", [15, 33])
def test_odd_channels_raise(channels):
    with pytest.raises(ValueError, match="channels must be even"):
        ShuffleAttention(channels)
