"""SRM (attnzoo/attention/srm.py) against a float64 reference written from the paper's style
pooling, channel-wise style integration and batch norm, element by element."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention.srm import StyleRecalibration


def style(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and sigma (unbiased, M - 1; 0 on a 1 x 1 map) of every (sample, channel)."""
    n, c, h, w = x.shape
    mean, std = torch.empty(n, c, dtype=x.dtype), torch.empty(n, c, dtype=x.dtype)
    for i in range(n):
        for k in range(c):
            values = [float(v) for v in x[i, k].flatten()]
            mu = sum(values) / len(values)
            spread = sum((v - mu) ** 2 for v in values)
            mean[i, k] = mu
            std[i, k] = math.sqrt(spread / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def reference(x: torch.Tensor, m: StyleRecalibration, batch_stats: bool):
    """(output, batch mean of z, unbiased batch variance of z)."""
    n, c = x.shape[:2]
    mean, std = style(x)
    weight = m.style_weight.detach().double()
    z = weight[:, 0] * mean + weight[:, 1] * std  # (N, C)
    bn = m.bn
    scale, shift = bn.weight.detach().double(), bn.bias.detach().double()
    out = torch.empty_like(x)
    z_mean, z_var = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    for k in range(c):
        column = [float(v) for v in z[:, k]]
        if batch_stats:
            mu = sum(column) / n
            var = sum((v - mu) ** 2 for v in column) / n
            z_mean[k], z_var[k] = mu, var * n / (n - 1)
        else:
            mu, var = float(bn.running_mean[k]), float(bn.running_var[k])
        for i in range(n):
            z_hat = (column[i] - mu) / math.sqrt(var + bn.eps) * float(scale[k]) + float(shift[k])
            out[i, k] = x[i, k] / (1 + math.exp(-z_hat))
    return out, z_mean, z_var


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 16, 5, 7), (3, 8, 1, 1), (2, 32, 4, 4), (5, 6, 7, 5)])
def test_matches_the_equations(mode, shape, randomize):
    torch.manual_seed(0)
    m = randomize(StyleRecalibration(shape[1])).double().train(mode == "train")
    running_mean, running_var = m.bn.running_mean.clone(), m.bn.running_var.clone()
    x = torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.3
    expected, z_mean, z_var = reference(x, m, batch_stats=mode == "train")
    out = m(x)
    assert (out / x).std() > 0.05  # random weights: the gates differ
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if mode == "train":  # the running statistics follow the batch's (momentum 0.1)
        torch.testing.assert_close(m.bn.running_mean, 0.9 * running_mean + 0.1 * z_mean)
        torch.testing.assert_close(m.bn.running_var, 0.9 * running_var + 0.1 * z_var)


def test_a_training_batch_of_one_uses_the_running_statistics(randomize):
    torch.manual_seed(0)
    m = randomize(StyleRecalibration(16)).double().train()
    x = torch.randn(1, 16, 5, 7, dtype=torch.float64)
    before = m.bn.running_mean.clone()
    torch.testing.assert_close(m(x), reference(x, m, batch_stats=False)[0], rtol=1e-10, atol=1e-10)
    assert torch.equal(m.bn.running_mean, before)


def test_starts_with_half_gates_and_constant_channels_get_finite_gradients():
    """CFC weights start at 0 (official code): every gate is sigmoid(0) in training mode.
    A constant channel has sigma = 0, where the square root's gradient must not be NaN."""
    m = StyleRecalibration(4).double().train()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), x / 2)
    x = torch.ones(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        m.style_weight.normal_()
    (m(x) * torch.randn(3, 4, 5, 5, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.style_weight.grad).all()


def test_parameters_and_resnet50_count():
    m = StyleRecalibration(64)
    assert sum(p.numel() for p in m.parameters()) == 4 * 64  # CFC 2 C, BN 2 C
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="srm")
    # 4 C per block: 4 (3*256 + 4*512 + 6*1024 + 3*2048) = 60,416 -> 25.62M
    assert count_params(model) == 25_557_032 + 60_416


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("srm")
    assert losses[-1] < losses[0]


def test_takes_no_options():
    with pytest.raises(ValueError, match="unknown option"):
        attnzoo.create_attention("srm", 16, reduction=16)
