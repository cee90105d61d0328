"""Bridge attention (BA-Net) and the seed-002 bridge head against their equations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.attention.bridge import BridgeAttention
from attnzoo.models import BasicBlock


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn1d_by_hand(v: torch.Tensor, bn: nn.BatchNorm1d, training: bool) -> torch.Tensor:
    """BatchNorm1d of (N, F) in float64; batch statistics in training unless N == 1."""
    if training and v.shape[0] > 1:
        mean = v.mean(0)
        var = ((v - mean) ** 2).mean(0)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    return (v - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()


def bridge_reference(x, earlier, module: BridgeAttention, training: bool) -> torch.Tensor:
    """s_i = BN_i(W_i GAP(X_i)); S = sum_i s_i; a = sigmoid(W_g relu(S)); Y = a * X_n."""
    x = x.double()
    feats = [f.double() for f in earlier] + [x]
    projs = list(module.earlier) + [module.current]
    fused = 0
    for feat, proj in zip(feats, projs, strict=True):
        z = feat.sum(dim=(2, 3)) / (feat.shape[2] * feat.shape[3])
        fused = fused + bn1d_by_hand(z @ proj[0].weight.double().T, proj[1], training)
    a = torch.sigmoid(torch.clamp(fused, min=0) @ module.fc.weight.double().T)
    return x * a[:, :, None, None]


@pytest.mark.parametrize("channels,earlier_channels", [(16, ()), (16, (16,)), (64, (32, 48))])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference(channels, earlier_channels, n, mode, randomize):
    torch.manual_seed(0)
    module = randomize(BridgeAttention(channels, earlier_channels, reduction=4))
    module.train(mode == "train")
    x = torch.randn(n, channels, 5, 7)
    earlier = [torch.randn(n, c, 9, 6).relu() for c in earlier_channels]
    expected = bridge_reference(x, earlier, module, mode == "train")
    torch.testing.assert_close(module(x, earlier).double(), expected, atol=1e-5, rtol=1e-5)


def test_batch_of_one_in_training_uses_running_stats_and_keeps_them():
    torch.manual_seed(0)
    module = BridgeAttention(32, (32,), reduction=4)
    x, earlier = torch.randn(1, 32, 4, 4), [torch.randn(1, 32, 4, 4)]
    before = module.current[1].running_mean.clone()
    trained = module.train()(x, earlier)
    torch.testing.assert_close(trained, module.eval()(x, earlier))
    assert torch.equal(module.current[1].running_mean, before)


def test_parameter_count():
    # hidden = 64 // 16 = 4: projections (32*4 + 2*4) + (64*4 + 2*4), generation 4*64.
    assert n_params(BridgeAttention(64, (32,))) == (32 * 4 + 8) + (64 * 4 + 8) + 4 * 64
    # resnet20: every block bridges conv1 (C) and conv2 (C) outputs, hidden max(1, C // 16).
    per_block = {
        c: 2 * (c * max(1, c // 16) + 2 * max(1, c // 16)) + max(1, c // 16) * c
        for c in (16, 32, 64)
    }
    expected = 269_722 + 3 * sum(per_block.values())
    assert n_params(attnzoo.create_model("resnet20", attention="bridge")) == expected


def test_block_bridges_its_first_conv_output():
    """In a BasicBlock the gate reads GAP(relu(bn1(conv1 x))) and GAP(bn2(conv2 ...))."""
    torch.manual_seed(0)
    make = attnzoo.models.common.attention_factory("bridge", {"reduction": 4})
    block = BasicBlock(16, 16, 1, "A", make).eval()
    x = torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        mid = block.relu(block.bn1(block.conv1(x)))
        last = block.bn2(block.conv2(mid))
        expected = torch.relu(bridge_reference(last, [mid], block.attention, False).float() + x)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_wrong_earlier_inputs_raise():
    module = BridgeAttention(16, (16,))
    x = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match="built for 1 earlier output"):
        module(x)
    with pytest.raises(ValueError, match="earlier outputs"):
        module(x, [torch.randn(2, 8, 4, 4)])
    with pytest.raises(ValueError, match="earlier outputs"):
        module(x, [torch.randn(3, 16, 4, 4)])
    with pytest.raises(ValueError, match="earlier_channels"):
        BridgeAttention(16, (0,))


def test_bridge_head_matches_its_equation():
    """logits = FC(W [GAP(X_1); GAP(X_2); GAP(X_3)] + b), the backbone's own FC."""
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="bridge_head").eval()
    net = model.backbone
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h1 = net.layer1(net.forward_stem(x))
        h2 = net.layer2(h1)
        h3 = net.layer3(h2)
        z = torch.cat([h.mean(dim=(2, 3)) for h in (h1, h2, h3)], 1)
        expected = net.fc(z @ model.bridge.weight.T + model.bridge.bias)
        torch.testing.assert_close(model(x), expected)
    assert n_params(model) == 269_722 + (16 + 32 + 64) * 64 + 64
