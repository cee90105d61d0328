"""SGE (attnzoo/attention/sge.py) against a float64 reference written from the paper's steps,
one sample, group and position at a time."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention.sge import SpatialGroupEnhance


def reference(x: torch.Tensor, gamma: list, beta: list, groups: int, biased: bool = False):
    """x^_i = x_i sigmoid(gamma c^_i + beta), c^ = (c - mu) / (sigma + 1e-5), c_i = g . x_i,
    g the mean of the group's vectors; sigma over the m positions with divisor m - 1 (the
    official code; ``biased``: divisor m, to show the test tells them apart)."""
    n, c, h, w = x.shape
    per_group, m = c // groups, h * w
    out = torch.empty_like(x)
    for i in range(n):
        for k in range(groups):
            block = x[i, k * per_group : (k + 1) * per_group]  # (C/G, H, W)
            vectors = [block[:, p, q] for p in range(h) for q in range(w)]
            g = sum(vectors) / m
            sims = [float(torch.dot(g, v)) for v in vectors]
            mu = sum(sims) / m
            divisor = m if biased else max(m - 1, 1)
            sigma = math.sqrt(sum((s - mu) ** 2 for s in sims) / divisor)
            for index, (p, q) in enumerate((p, q) for p in range(h) for q in range(w)):
                a = gamma[k] * (sims[index] - mu) / (sigma + 1e-5) + beta[k]
                out[i, k * per_group : (k + 1) * per_group, p, q] = vectors[index] / (
                    1 + math.exp(-a)
                )
    return out


def params(m: SpatialGroupEnhance) -> tuple[list, list]:
    return m.gamma.detach().double().tolist(), m.beta.detach().double().tolist()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((2, 16, 7, 5), 4), ((1, 12, 3, 3), 64), ((2, 32, 1, 1), 8), ((3, 10, 4, 6), 64),
     ((1, 16, 7, 5), 64)],
)  # fmt: skip
def test_matches_the_equations(mode, shape, groups, randomize):
    torch.manual_seed(0)
    m = randomize(SpatialGroupEnhance(shape[1], groups=groups)).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) + 0.5
    expected = reference(x, *params(m), m.groups)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 1e-2


def test_the_standard_deviation_is_the_unbiased_one(randomize):
    """The test would notice the paper-style biased sigma (divisor m): they differ by far
    more than the tolerance."""
    torch.manual_seed(0)
    m = randomize(SpatialGroupEnhance(16, groups=4)).double()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    biased = reference(x, *params(m), 4, biased=True)
    assert (m(x) - biased).abs().max() > 1e-4


def test_official_initialisation_and_one_by_one_maps():
    m = SpatialGroupEnhance(128).double()
    assert m.groups == 64
    assert torch.equal(m.gamma, torch.zeros(64)) and torch.equal(m.beta, torch.ones(64))
    x = torch.randn(2, 128, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), x * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)))
    with torch.no_grad():
        m.gamma.fill_(3.0)
    one = torch.randn(2, 128, 1, 1, dtype=torch.float64, requires_grad=True)
    out = m(one)  # one position: c^ = 0, the gate is sigmoid(beta)
    torch.testing.assert_close(out, one * torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)))
    out.sum().backward()
    assert torch.isfinite(one.grad).all() and torch.isfinite(m.gamma.grad).all()


def test_a_constant_group_has_finite_gradients():
    """c is constant over the positions (zero spread): the gradients stay finite (a plain
    sqrt would give NaN there, as the official code's ``std`` does)."""
    m = SpatialGroupEnhance(8, groups=2).double()
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = torch.ones(1, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.gamma.grad).all()


@pytest.mark.parametrize(
    ("channels", "requested", "used"),
    [(2048, 64, 64), (256, 64, 64), (16, 64, 16), (32, 64, 32), (300, 64, 60), (342, 64, 57),
     (216, 64, 54), (24, 64, 24), (96, 32, 32), (7, 64, 7), (49, 8, 7)],
)  # fmt: skip
def test_groups_fall_back_to_the_largest_divisor(channels, requested, used):
    m = SpatialGroupEnhance(channels, groups=requested)
    assert m.groups == used and channels % used == 0
    # one gamma and one beta per group
    assert sum(p.numel() for p in m.parameters()) == 2 * used


def test_resnet50_parameters_match_the_official_readme():
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="sge")
    # 16 blocks x 64 groups x (gamma, beta) = 2,048 added; the PytorchInsight README lists
    # SGE-ResNet50 at 25.56M.
    assert count_params(model) == 25_557_032 + 2_048
    assert round(count_params(model) / 1e6, 2) == 25.56


def test_bfloat16_input_keeps_float32_statistics(randomize):
    """The gate of a bf16 input equals the float64 gate of the same (bf16-rounded) values to
    float32 precision; statistics computed in bf16 would be off by ~1e-2."""
    torch.manual_seed(0)
    m = randomize(SpatialGroupEnhance(32, groups=8))
    x = (torch.randn(2, 32, 6, 6) * 3 + 1).bfloat16()
    gate = m.gate(x)
    assert gate.dtype == torch.float32 and m(x).dtype == torch.bfloat16
    exact = m.double().gate(x.double())
    torch.testing.assert_close(gate.double(), exact, rtol=1e-5, atol=1e-5)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("sge")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("groups", [0, -4, 2.0, True, "64", None])
def test_bad_groups(groups):
    with pytest.raises(ValueError, match="groups"):
        SpatialGroupEnhance(16, groups=groups)
