"""scSE (attnzoo/attention/scse.py) against a float64 reference written from Roy et al.'s
cSE, sSE and scSE definitions, one sample, channel and position at a time."""

from __future__ import annotations

import math

import pytest
import torch

from attnzoo.attention.scse import ConcurrentSpatialChannelSE


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def reference(x: torch.Tensor, m: ConcurrentSpatialChannelSE, combine: str) -> torch.Tensor:
    n, c, h, w = x.shape
    w_down = m.channel_fc1.weight.detach().double()[:, :, 0, 0].tolist()  # (C/r, C)
    b_down = m.channel_fc1.bias.detach().double().tolist()
    w_up = m.channel_fc2.weight.detach().double()[:, :, 0, 0].tolist()  # (C, C/r)
    b_up = m.channel_fc2.bias.detach().double().tolist()
    w_sq = m.spatial_conv.weight.detach().double()[0, :, 0, 0].tolist()  # (C,)
    b_sq = m.spatial_conv.bias.detach().double().item()
    hidden = len(w_down)
    out = torch.empty_like(x)
    for i in range(n):
        # cSE: z = GAP(U), z^ = sigmoid(W_1 relu(W_2 z))
        z = [x[i, k].sum().item() / (h * w) for k in range(c)]
        hid = [
            max(0.0, sum(w_down[j][k] * z[k] for k in range(c)) + b_down[j]) for j in range(hidden)
        ]
        z_hat = [
            sigmoid(sum(w_up[k][j] * hid[j] for j in range(hidden)) + b_up[k]) for k in range(c)
        ]
        for p in range(h):
            for q in range(w):
                # sSE: q = W_sq U(p, q) + b, one value per position
                s = sigmoid(sum(w_sq[k] * x[i, k, p, q].item() for k in range(c)) + b_sq)
                for k in range(c):
                    u = x[i, k, p, q].item()
                    by_channel, by_position = z_hat[k] * u, s * u
                    out[i, k, p, q] = (
                        by_channel + by_position
                        if combine == "add"
                        else max(by_channel, by_position)
                    )
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("combine", ["add", "max"])
@pytest.mark.parametrize(
    ("shape", "reduction"), [((2, 16, 7, 5), 2), ((1, 6, 1, 1), 2), ((3, 8, 3, 4), 4)]
)
def test_matches_the_equations(mode, combine, shape, reduction, randomize):
    torch.manual_seed(0)
    m = ConcurrentSpatialChannelSE(shape[1], reduction=reduction, combine=combine)
    m = randomize(m).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) + 0.2
    expected = reference(x, m, combine)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 1e-2


def test_the_two_combinations_differ_and_each_gate_matters(randomize):
    torch.manual_seed(0)
    m = randomize(ConcurrentSpatialChannelSE(16)).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    added = m(x)
    m.combine = "max"
    assert (m(x) - added).abs().max() > 1e-2
    channel, spatial = m.channel_gate(x), m.spatial_gate(x)
    assert channel.shape == (2, 16, 1, 1) and spatial.shape == (2, 1, 5, 5)
    assert channel.std() > 1e-2 and spatial.std() > 1e-2  # neither gate is constant


def test_parameters():
    m = ConcurrentSpatialChannelSE(64)
    # cSE: 64*32 + 32 + 32*64 + 64 = 4,192; sSE: 64 + 1 = 65
    assert m.channel_fc1.out_channels == 32
    assert sum(p.numel() for p in m.parameters()) == 4_192 + 65
    m = ConcurrentSpatialChannelSE(16, reduction=16)  # max(1, 16 // 16) = 1 hidden unit
    assert sum(p.numel() for p in m.parameters()) == (16 + 1) + (16 + 16) + (16 + 1)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("scse")
    assert losses[-1] < losses[0]
    losses = losses_in_resnet20("scse", combine="max")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reduction": 0}, "reduction"), ({"reduction": "2"}, "reduction"),
     ({"combine": "mul"}, "combine"), ({"combine": "concat"}, "combine")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConcurrentSpatialChannelSE(16, **kwargs)
