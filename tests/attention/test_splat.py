"""Split attention (attnzoo/attention/splat.py) against a float64 reference written from the
ResNeSt paper's Eqs. 1-4, against timm's SplitAttn with the same weights, and in ResNets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.attention.splat import SplitAttentionConv
from attnzoo.measure import count_params


def _bn(t: torch.Tensor, bn, training: bool) -> torch.Tensor:
    dims = (0, 2, 3) if t.dim() == 4 else (0,)
    shape = [1, -1] + [1] * (t.dim() - 2)
    if training:
        mean, var = t.mean(dim=dims, keepdim=True), t.var(dim=dims, keepdim=True, unbiased=False)
    else:
        mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def reference(x: torch.Tensor, m: SplitAttentionConv, training: bool) -> torch.Tensor:
    big_k, big_r, c = m.groups, m.radix, m.out_channels
    u = torch.relu(_bn(F.conv2d(x, m.conv.weight, None, m.stride, 1, 1, big_k * big_r),
                       m.bn0, training))  # fmt: skip
    width = c // big_k  # channels of one feature-map group
    # feature-map group U_{R(k-1)+i}: radix split i, cardinal group k (the official layout)
    group = {(k, i): u[:, i * c + k * width : i * c + (k + 1) * width]
             for k in range(big_k) for i in range(big_r)}  # fmt: skip
    s = torch.cat(
        [sum(group[k, i] for i in range(big_r)).mean(dim=(2, 3)) for k in range(big_k)], 1
    )  # Eqs. 1-2 for every k, (N, C)
    fc1_w = m.fc1.weight[:, :, 0, 0]
    hidden = fc1_w.shape[0] // big_k
    z = torch.cat(
        [s[:, k * width : (k + 1) * width] @ fc1_w[k * hidden : (k + 1) * hidden].T
         for k in range(big_k)], 1
    ) + m.fc1.bias  # fmt: skip
    z = torch.relu(_bn(z, m.bn1, training))
    fc2_w = m.fc2.weight[:, :, 0, 0]
    out = []
    for k in range(big_k):
        rows = slice(k * big_r * width, (k + 1) * big_r * width)
        g = z[:, k * hidden : (k + 1) * hidden] @ fc2_w[rows].T + m.fc2.bias[rows]
        g = g.view(-1, big_r, width)  # G_i^c(s^k)
        a = torch.sigmoid(g) if big_r == 1 else torch.exp(g) / torch.exp(g).sum(1, keepdim=True)
        out.append(sum(a[:, i, :, None, None] * group[k, i] for i in range(big_r)))  # Eqs. 3-4
    return torch.cat(out, 1)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "out", "stride", "groups", "radix"),
    [((2, 16, 7, 5), 16, 1, 1, 2), ((3, 8, 9, 8), 12, 2, 2, 2), ((2, 12, 5, 5), 12, 1, 2, 3),
     ((2, 8, 4, 6), 8, 1, 1, 1)],
)  # fmt: skip
def test_matches_the_equations(mode, shape, out, stride, groups, radix, randomize):
    torch.manual_seed(0)
    m = SplitAttentionConv(shape[1], out, stride, groups, radix, min_hidden=4).double()
    randomize(m).train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    expected = reference(x, m, mode == "train")
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_matches_timm_split_attention_with_the_same_weights(randomize):
    """timm's SplitAttn (with BN) is the official layout: its tensors load as they are."""
    split_attn = pytest.importorskip("timm.layers").SplitAttn
    torch.manual_seed(0)
    theirs = split_attn(64, 64, 3, stride=2, padding=1, groups=2, radix=2, rd_ratio=0.25,
                        rd_divisor=1, norm_layer=torch.nn.BatchNorm2d).eval()  # fmt: skip
    ours = SplitAttentionConv(64, 64, stride=2, groups=2, radix=2).eval()
    randomize(theirs)
    assert theirs.fc1.out_channels == ours.fc1.out_channels == 32  # max(64 * 2 / 4, 32)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 64, 9, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_gradients_with_stride_and_groups(assert_gradients, randomize):
    torch.manual_seed(0)
    m = randomize(SplitAttentionConv(8, 12, 2, 2, 2, min_hidden=4).double()).train()
    m(torch.randn(3, 8, 7, 6, dtype=torch.float64)).square().sum().backward()
    assert_gradients(m, "splat")


def test_parameters():
    m = SplitAttentionConv(64)  # d = max(64 * 2 // 4, 32) = 32
    # conv 128 * 32 * 9 (2 groups), bn0 2 * 128, fc1 64 * 32 + 32, bn1 2 * 32, fc2 32 * 128 + 128
    assert count_params(m) == 36864 + 256 + 2080 + 64 + 4224


def test_resnest50_is_the_papers_27_5m_up_to_its_deep_stem():
    """ResNeSt-50 (radix 2, cardinality 1, width 64): 27.5M in the paper; timm's resnest50d
    (27,483,240) differs from ours only by its deep 3x3 stem (3-32-32-64: +19,232)."""
    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="splat")
    assert count_params(model) == 27_464_008 == 27_483_240 - 19_232
    block = model.layer3[0]
    assert isinstance(block.conv2, SplitAttentionConv) and block.conv2.stride == 2
    assert isinstance(block.bn2, torch.nn.Identity)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("splat")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"radix": 0}, "radix"), ({"reduction": 0}, "reduction"), ({"min_hidden": 0}, "min_hidden"),
     ({"groups": 3}, "groups=3 must divide"), ({"stride": 0}, "stride")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitAttentionConv(16, **kwargs)
