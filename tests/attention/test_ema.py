"""EMA (attnzoo/attention/ema.py) against a float64 reference written from its equations,
group by group and sample by sample: the 3x3 conv as a sum over its nine shifted taps, the
1x1 conv as a matrix, GroupNorm and softmax by hand."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.ema import EfficientMultiScaleAttention


def softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def one_group(x: torch.Tensor, m: EfficientMultiScaleAttention) -> torch.Tensor:
    """Y = X sigmoid(A) for one group X (c, H, W) of one sample."""
    c, h, w = x.shape
    w1 = m.conv1x1.weight.detach().double()[:, :, 0, 0]
    b1 = m.conv1x1.bias.detach().double()
    w3, b3 = m.conv3x3.weight.detach().double(), m.conv3x3.bias.detach().double()
    scale, shift = m.gn.weight.detach().double(), m.gn.bias.detach().double()
    z_h = x.sum(dim=2) / w  # (c, H)
    z_w = x.sum(dim=1) / h  # (c, W)
    a_h = w1 @ z_h + b1[:, None]
    a_w = w1 @ z_w + b1[:, None]
    gated = x * torch.sigmoid(a_h)[:, :, None] * torch.sigmoid(a_w)[:, None, :]
    x1 = torch.empty_like(x)
    for k in range(c):  # GroupNorm with one channel per group
        mean = gated[k].sum() / (h * w)
        var = ((gated[k] - mean) ** 2).sum() / (h * w)
        x1[k] = (gated[k] - mean) / torch.sqrt(var + 1e-5) * scale[k] + shift[k]
    padded = torch.zeros(c, h + 2, w + 2, dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    x3 = b3[:, None, None].expand(c, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            x3 += torch.einsum("kj,jhw->khw", w3[:, :, dy, dx], padded[:, dy : dy + h, dx : dx + w])
    p1 = softmax(x1.sum(dim=(1, 2)) / (h * w))
    p3 = softmax(x3.sum(dim=(1, 2)) / (h * w))
    a = sum(p1[k] * x3[k] + p3[k] * x1[k] for k in range(c))  # (H, W)
    return x * torch.sigmoid(a)[None]


def reference(x: torch.Tensor, m: EfficientMultiScaleAttention) -> torch.Tensor:
    n, channels = x.shape[:2]
    c = channels // m.groups
    out = torch.empty_like(x)
    for i in range(n):
        for g in range(m.groups):
            out[i, g * c : (g + 1) * c] = one_group(x[i, g * c : (g + 1) * c], m)
    return out


CASES = [
    ((2, 64, 7, 5), {"groups": 8}),  # 8 channels per group
    ((2, 64, 6, 6), {}),  # 32 groups of 2
    ((3, 48, 5, 4), {}),  # 48 -> 24 groups of 2
    ((1, 32, 1, 1), {"groups": 4}),
    ((2, 16, 7, 5), {}),  # one channel per group
    ((1, 30, 4, 7), {"groups": 4}),  # 30 -> 3 groups of 10
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("shape", "options"), CASES)
def test_matches_the_equations(mode, shape, options, randomize):
    torch.manual_seed(0)
    m = randomize(EfficientMultiScaleAttention(shape[1], **options)).double()
    m.train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    out = m(x)
    assert (out / x).std() > 0.05 or shape[2:] == (1, 1)  # the spatial maps vary
    torch.testing.assert_close(out, reference(x, m), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("channels", "groups", "used"),
    [(2048, 32, 32), (16, 32, 16), (300, 32, 30), (342, 32, 19), (64, 7, 4), (5, 32, 5)],
)
def test_groups_are_the_largest_divisor_allowed(channels, groups, used):
    m = EfficientMultiScaleAttention(channels, groups=groups)
    assert m.groups == used and m.conv3x3.in_channels == channels // used


def test_one_channel_per_group_adds_the_two_branches(randomize):
    """With c = 1 both softmaxes are 1: A = X1 + X3."""
    torch.manual_seed(0)
    m = randomize(EfficientMultiScaleAttention(16)).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    grouped = x.reshape(32, 1, 5, 5)
    x3 = m.conv3x3(grouped)
    # a 1x1 conv acts position by position: on each pooled descriptor separately
    gate_h = torch.sigmoid(m.conv1x1(grouped.mean(3, keepdim=True)))  # (32, 1, 5, 1)
    gate_w = torch.sigmoid(m.conv1x1(grouped.mean(2, keepdim=True)))  # (32, 1, 1, 5)
    x1 = m.gn(grouped * gate_h * gate_w)
    torch.testing.assert_close(m.spatial_logits(grouped), x1 + x3, rtol=1e-10, atol=1e-10)


def test_first_softmax_is_the_softmax_of_the_gn_shift(randomize):
    """Each GN group is one channel normalised over H x W: its mean is exactly the shift."""
    torch.manual_seed(0)
    m = randomize(EfficientMultiScaleAttention(64, groups=8)).double()
    grouped = torch.randn(6, 8, 5, 7, dtype=torch.float64)
    h, w = 5, 7
    a_h, a_w = m.conv1x1(
        torch.cat([grouped.mean(3, keepdim=True), grouped.mean(2, keepdim=True).transpose(2, 3)], 2)
    ).split([h, w], dim=2)
    x1 = m.gn(grouped * torch.sigmoid(a_h) * torch.sigmoid(a_w).transpose(2, 3))
    expected = m.gn.bias.detach().expand(6, 8)
    torch.testing.assert_close(x1.mean(dim=(2, 3)), expected, rtol=1e-10, atol=1e-10)


def test_parameters_and_resnet50_count():
    # c = 8: conv1x1 64 + 8, conv3x3 576 + 8, GN 16
    assert sum(p.numel() for p in EfficientMultiScaleAttention(256).parameters()) == 672
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="ema")
    # 10 c^2 + 4 c per block, c = C / 32 = 8, 16, 32, 64 in the four stages
    extra = 3 * 672 + 4 * 2_624 + 6 * 10_368 + 3 * 41_216
    assert extra == 198_368
    assert count_params(model) == 25_557_032 + extra


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("ema")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "32"])
def test_bad_groups(bad):
    with pytest.raises(ValueError, match="groups must be a positive int"):
        EfficientMultiScaleAttention(16, groups=bad)
