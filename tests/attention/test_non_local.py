"""The non-local block (attnzoo/attention/non_local.py, registered as "nonlocal") against a
float64 reference written from Wang et al. Eqs. 1, 3 and 6, with the HW x HW map and the
subsampling windows written out."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.non_local import NonLocalBlock, subsample_2x2
from attnzoo.registry import default_placement


def conv1x1(conv: torch.nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of one sample's features a (C_in, P) as a matrix product."""
    return conv.weight.detach().double().flatten(1) @ a + conv.bias.detach().double()[:, None]


def max_pool_by_hand(t: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (C, H', W'): the max over 2 x 2 windows at stride 2 along each side of at
    least 2, a last partial window kept (7 -> 4); a side of 1 stays as it is."""
    _, h, w = t.shape
    rows = [range(i, min(i + 2, h)) for i in range(0, h, 2)] if h >= 2 else [range(1)]
    cols = [range(j, min(j + 2, w)) for j in range(0, w, 2)] if w >= 2 else [range(1)]
    out = torch.empty(t.shape[0], len(rows), len(cols), dtype=t.dtype)
    for a, rs in enumerate(rows):
        for b, cs in enumerate(cols):
            window = torch.stack([t[:, r, c] for r in rs for c in cs], dim=1)  # (C, k)
            out[:, a, b] = window.max(dim=1).values
    return out


def reference(x: torch.Tensor, m: NonLocalBlock, training: bool) -> torch.Tensor:
    """y_i = sum_j exp(theta_i . phi_j) g_j / sum_j exp(theta_i . phi_j)   (Eqs. 1, 3)
    z_i = BN(W_z y_i) + x_i                                              (Eq. 6)"""
    n_batch, channels, height, width = x.shape
    ws = []
    for n in range(n_batch):
        a = x[n].reshape(channels, -1)
        theta, phi, g = conv1x1(m.theta, a), conv1x1(m.phi, a), conv1x1(m.g, a)
        if m.subsample:
            inner = phi.shape[0]
            phi = max_pool_by_hand(phi.reshape(inner, height, width)).reshape(inner, -1)
            g = max_pool_by_hand(g.reshape(inner, height, width)).reshape(inner, -1)
        y = torch.empty_like(theta)
        for i in range(theta.shape[1]):
            energies = torch.stack([theta[:, i] @ phi[:, j] for j in range(phi.shape[1])])
            f = torch.exp(energies - energies.max())
            y[:, i] = (g * f[None, :]).sum(dim=1) / f.sum()
        ws.append(conv1x1(m.out_conv, y))  # W_z y, (C, P)
    w_y = torch.stack(ws)  # (N, C, P)
    bn = m.out_bn
    if training:
        mean = w_y.mean(dim=(0, 2))
        var = ((w_y - mean[None, :, None]) ** 2).mean(dim=(0, 2))
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    normed = (w_y - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    normed = normed * bn.weight.detach().double()[None, :, None]
    normed = normed + bn.bias.detach().double()[None, :, None]
    return x + normed.reshape(x.shape)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (2, 32, 1, 1), (3, 20, 4, 6), (1, 16, 1, 5)])
@pytest.mark.parametrize("subsample", [False, True])
def test_matches_the_equations(mode, shape, subsample, randomize):
    torch.manual_seed(0)
    m = randomize(NonLocalBlock(shape[1], subsample=subsample)).double()
    m.train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    expected = reference(x, m, mode == "train")
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("size", "pooled"), [((8, 8), (4, 4)), ((7, 5), (4, 3)), ((1, 5), (1, 3)), ((1, 1), (1, 1)),
                         ((2, 1), (1, 1))],
)  # fmt: skip
def test_subsampling_keeps_every_position(size, pooled):
    t = torch.randn(2, 3, *size, dtype=torch.float64)
    out = subsample_2x2(t)
    assert out.shape[2:] == pooled
    torch.testing.assert_close(out[0], max_pool_by_hand(t[0]), rtol=0, atol=0)


def test_subsampling_changes_the_output(randomize):
    torch.manual_seed(0)
    full = randomize(NonLocalBlock(16)).double()
    sub = NonLocalBlock(16, subsample=True).double()
    sub.load_state_dict(full.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    assert (full(x) - sub(x)).abs().max() > 1e-3


def test_starts_as_the_identity():
    """W_z's BN has its scale at zero (Sec. 3.3), so z = x at initialisation."""
    m = NonLocalBlock(16).train()
    x = torch.randn(2, 16, 5, 3)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)


def test_biases_that_never_reach_the_output(randomize):
    """phi's bias: the softmax over keys ignores it. g's: the softmax average passes it on
    as a constant, which the BN's batch mean removes in training mode, but not in eval mode
    (conftest.ZERO_GRADIENT_BY_CONSTRUCTION lists them)."""
    torch.manual_seed(0)
    m = randomize(NonLocalBlock(16)).double()
    x = torch.randn(3, 16, 4, 5, dtype=torch.float64)
    for mode, g_matters in (("train", False), ("eval", True)):
        m.train(mode == "train")
        before = m(x)
        with torch.no_grad():
            m.phi.bias.add_(2.0)
        torch.testing.assert_close(m(x), before, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            m.g.bias.add_(2.0)
        assert ((m(x) - before).abs().max() > 1e-3) == g_matters


def test_parameter_count_and_placement():
    # C = 64, inner 32: theta, phi, g 3 * (64*32 + 32), W_z 32*64 + 64, BN 2*64
    m = NonLocalBlock(64)
    assert sum(p.numel() for p in m.parameters()) == 3 * 2080 + 2112 + 128
    assert NonLocalBlock(16).theta.out_channels == 8
    assert NonLocalBlock(1).theta.out_channels == 1  # max(1, 1 // 2)
    assert default_placement("nonlocal") == "stage"
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="nonlocal")
    assert [s.channels for s in model.stage_attention] == [256, 512, 1024]
    assert count_params(model) == 28_317_608


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("nonlocal")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reduction": 0}, "reduction"), ({"reduction": float("inf")}, "reduction"),
     ({"reduction": "2"}, "reduction"), ({"subsample": 1}, "subsample")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonLocalBlock(16, **kwargs)
