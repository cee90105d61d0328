"""SimAM (attnzoo/attention/simam.py) against a float64 reference written from the paper's
minimal energy (Eq. 5) and refinement (Eq. 6)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.simam import SimAM


def reference(x: torch.Tensor, lam: float) -> torch.Tensor:
    """out = sigmoid(1 / E) * X with e*_t = 4 (s2 + lam) / ((t - mu)^2 + 2 s2 + 2 lam), the
    variance over the M = H W positions of a channel with M - 1 in the denominator."""
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        for j in range(c):
            t = x[i, j]
            mu = t.sum() / t.numel()
            s2 = ((t - mu) ** 2).sum() / max(t.numel() - 1, 1)
            energy = 4 * (s2 + lam) / ((t - mu) ** 2 + 2 * s2 + 2 * lam)
            out[i, j] = t / (1 + torch.exp(-1 / energy))
    return out


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 4), (3, 4, 6, 6)])
@pytest.mark.parametrize("lam", [1e-4, 0.1])
def test_matches_the_energy_equations(shape, lam):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.3
    module = SimAM(shape[1], e_lambda=lam)
    expected = reference(x, lam)
    # The module computes its statistics in float32: compare at float32 precision.
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module(x.float()).double(), expected, rtol=1e-5, atol=1e-6)


def test_a_one_by_one_map_gets_the_constant_gate():
    x = torch.randn(2, 5, 1, 1)
    torch.testing.assert_close(SimAM(5)(x), x * torch.sigmoid(torch.tensor(0.5)))


def test_outlying_activations_are_kept_more():
    """The gate grows with (t - mu)^2: the channel's outlier keeps the most of itself."""
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = 5.0
    gate = SimAM(1)(x + 1e-3) / (x + 1e-3)
    assert gate[0, 0, 1, 2] == gate.max() and gate.max() > 0.95  # sigmoid(4.02)


def test_parameter_free_registered_and_trains(losses_in_resnet20):
    model = attnzoo.create_model("resnet20", attention="simam")
    assert sum(p.numel() for p in model.parameters()) == 269_722  # resnet20's own
    assert attnzoo.registry.default_placement("simam") == "block"
    losses = losses_in_resnet20("simam")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "1e-4"])
def test_bad_lambda(bad):
    with pytest.raises(ValueError, match="e_lambda must be a finite number > 0"):
        SimAM(4, e_lambda=bad)
