"""GCT (attnzoo/attention/gct.py) against a float64 reference written from the paper's
Eqs. 1-3 (and the official code's l1 option), channel by channel."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention.gct import GatedChannelTransformation

EPS = 1e-5


def reference(x: torch.Tensor, m: GatedChannelTransformation, mode: str = "l2") -> torch.Tensor:
    """y_c = x_c (1 + tanh(gamma_c s^_c + beta_c)), sample by sample, channel by channel."""
    n, c = x.shape[:2]
    alpha, gamma, beta = (p.detach().double() for p in (m.alpha, m.gamma, m.beta))
    out = torch.empty_like(x)
    for i in range(n):
        if mode == "l2":
            s = [alpha[k] * math.sqrt(float((x[i, k] ** 2).sum()) + EPS) for k in range(c)]
            norm = math.sqrt(sum(float(v) ** 2 for v in s) + EPS)  # Eq. 2, eps on the sum
            s_hat = [math.sqrt(c) * v / norm for v in s]
        else:
            s = [alpha[k] * float(x[i, k].abs().sum()) for k in range(c)]
            norm = sum(abs(float(v)) for v in s) + EPS
            s_hat = [c * v / norm for v in s]
        for k in range(c):
            out[i, k] = x[i, k] * (1 + torch.tanh(gamma[k] * s_hat[k] + beta[k]))
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 8, 1, 1), (3, 32, 4, 4), (2, 5, 7, 5)])
def test_matches_the_equations(mode, norm, shape, randomize):
    torch.manual_seed(0)
    m = randomize(GatedChannelTransformation(shape[1], mode=norm)).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    expected = reference(x, m, norm)
    out = m(x)
    gate = out / x
    assert gate.std() > 0.05  # random gamma, beta: the gates differ from 1 and from each other
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_epsilon_sits_on_the_sum_as_in_eq_2():
    """On a small input the paper's sqrt(sum s^2 + eps) and the official code's
    sqrt(mean s^2 + eps) (C eps on the sum) differ visibly; we follow the paper."""
    torch.manual_seed(0)
    m = GatedChannelTransformation(8).double()
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = 1e-3 * torch.randn(2, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(x, m), rtol=1e-10, atol=1e-10)
    embedding = (x.square().sum(dim=(2, 3), keepdim=True) + EPS).sqrt()
    official = embedding / (embedding.square().mean(dim=1, keepdim=True) + EPS).sqrt()
    assert (m(x) - x * (1 + torch.tanh(official))).abs().max() > 1e-4


def test_starts_as_the_identity():
    x = torch.randn(2, 16, 5, 7)
    m = GatedChannelTransformation(16)
    assert torch.equal(m(x), x)  # gamma = beta = 0: every gate is 1 + tanh(0)
    assert torch.equal(m.alpha, torch.ones(16))


def test_channels_compete():
    """Raising one channel's energy lowers the normalised embedding of the others."""
    m = GatedChannelTransformation(4)
    with torch.no_grad():
        m.gamma.fill_(1.0)
    x = torch.ones(1, 4, 3, 3)
    louder = x.clone()
    louder[0, 0] *= 3
    assert (m.gate(louder)[0, 1:] < m.gate(x)[0, 1:]).all()
    assert m.gate(louder)[0, 0] > m.gate(x)[0, 0]


def test_statistics_stay_float32_under_bf16():
    torch.manual_seed(0)
    m = GatedChannelTransformation(16)
    x = torch.randn(2, 16, 8, 8).bfloat16()
    assert m.gate(x).dtype == torch.float32 and m(x).dtype == torch.bfloat16


def test_parameters_and_resnet50_count():
    assert sum(p.numel() for p in GatedChannelTransformation(64).parameters()) == 3 * 64
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="gct")
    # 3 C per block on the block outputs: 3 (3*256 + 4*512 + 6*1024 + 3*2048) = 3 * 15,104
    assert count_params(model) == 25_557_032 + 45_312


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("gct")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "l3"}, "mode"), ({"mode": "L2"}, "mode"), ({"epsilon": 0}, "epsilon"),
     ({"epsilon": float("inf")}, "epsilon"), ({"epsilon": True}, "epsilon")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedChannelTransformation(16, **kwargs)
