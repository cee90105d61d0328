"""eSE (attnzoo/attention/ese.py) against a float64 reference written from CenterMask's
equations: Y = hsigmoid(W_C GAP(X) + b) * X, with hsigmoid(z) = ReLU6(z + 3) / 6."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.ese import EffectiveSqueezeExcite


def reference(x: torch.Tensor, m: EffectiveSqueezeExcite, gate: str) -> torch.Tensor:
    n, c, h, w = x.shape
    weight = m.fc.weight.detach().double()[:, :, 0, 0]  # (C_out, C_in)
    bias = m.fc.bias.detach().double()
    out = torch.empty_like(x)
    for i in range(n):
        pooled = [x[i, k].sum() / (h * w) for k in range(c)]
        for o in range(c):
            z = sum(weight[o, k] * pooled[k] for k in range(c)) + bias[o]
            if gate == "hard_sigmoid":
                a = min(max(z.item() + 3.0, 0.0), 6.0) / 6.0
            else:
                a = 1.0 / (1.0 + torch.exp(-z).item())
            out[i, o] = a * x[i, o]
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (1, 8, 1, 1), (3, 5, 4, 6)])
def test_matches_the_equations(mode, gate, shape, randomize):
    torch.manual_seed(0)
    m = randomize(EffectiveSqueezeExcite(shape[1], gate=gate)).double().train(mode == "train")
    with torch.no_grad():
        m.fc.weight.mul_(8.0)  # push some logits past +-3, where the hard sigmoid clips
    x = torch.randn(*shape, dtype=torch.float64) + 0.3
    expected = reference(x, m, gate)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 1e-2  # the gate is not the identity


def test_hard_sigmoid_clips_and_differs_from_the_sigmoid(randomize):
    torch.manual_seed(0)
    m = randomize(EffectiveSqueezeExcite(16)).double()
    with torch.no_grad():
        m.fc.weight.mul_(8.0)
    x = torch.randn(4, 16, 3, 3, dtype=torch.float64)
    gates = m.gate(x)
    assert (gates == 0).any() and (gates == 1).any()  # both saturated ends are reached
    m.gate_name = "sigmoid"
    assert (m.gate(x) - gates).abs().max() > 1e-2


def test_same_as_timm_effective_se():
    layers = pytest.importorskip("timm.layers.squeeze_excite")
    torch.manual_seed(0)
    theirs = layers.EffectiveSEModule(32)
    ours = EffectiveSqueezeExcite(32)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 7, 5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_parameters():
    # one 1x1 conv C -> C with bias: C^2 + C
    assert sum(p.numel() for p in EffectiveSqueezeExcite(64).parameters()) == 64 * 64 + 64
    assert sum(p.numel() for p in EffectiveSqueezeExcite(16).parameters()) == 272


def test_resnet50_parameters():
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="ese")
    # 3 (256^2+256) + 4 (512^2+512) + 6 (1024^2+1024) + 3 (2048^2+2048) = 20,134,656 added
    assert count_params(model) == 25_557_032 + 20_134_656


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("ese")
    assert losses[-1] < losses[0]
    losses = losses_in_resnet20("ese", gate="sigmoid")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("gate", ["hsigmoid", "relu", None, 1])
def test_bad_gate(gate):
    with pytest.raises(ValueError, match="gate"):
        EffectiveSqueezeExcite(16, gate=gate)
