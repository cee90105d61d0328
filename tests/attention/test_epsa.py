"""Pyramid split attention (attnzoo/attention/epsa.py) against a float64 reference written
from the EPSANet paper's Eqs. 1-9, and in the ResNets whose 3x3 convs it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.attention.epsa import PyramidSplitAttention
from attnzoo.measure import count_params


def reference(x: torch.Tensor, m: PyramidSplitAttention) -> torch.Tensor:
    feats = [
        F.conv2d(x, conv.weight, None, m.stride, k // 2, 1, conv.groups)
        for k, conv in zip(m.kernels, m.scale_convs, strict=True)
    ]  # SPC, Eqs. 1-3
    w0, b0 = m.se[0].weight[:, :, 0, 0], m.se[0].bias
    w1, b1 = m.se[2].weight[:, :, 0, 0], m.se[2].bias
    z = [torch.sigmoid(torch.relu(f.mean(dim=(2, 3)) @ w0.T + b0) @ w1.T + b1) for f in feats]
    total = sum(torch.exp(zi) for zi in z)
    return torch.cat(
        [f * (torch.exp(zi) / total)[:, :, None, None] for f, zi in zip(feats, z, strict=True)], 1
    )  # Eqs. 5-9


@pytest.mark.parametrize(
    ("shape", "out", "stride", "kernels", "scale_groups"),
    [((2, 16, 7, 5), 16, 1, (3, 5, 7, 9), (1, 4, 8, 16)),
     ((3, 32, 9, 8), 64, 2, (3, 5, 7, 9), (1, 4, 8, 16)),
     ((2, 12, 5, 5), 6, 1, (3, 5), (2, 3))],
)  # fmt: skip
def test_matches_the_equations(shape, out, stride, kernels, scale_groups, randomize):
    torch.manual_seed(0)
    m = PyramidSplitAttention(
        shape[1], out, stride, kernels=kernels, scale_groups=scale_groups
    ).double()
    randomize(m)
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference(x, m), rtol=1e-10, atol=1e-10)


def test_group_counts_are_lowered_to_fit_narrow_widths():
    m = PyramidSplitAttention(16)  # parts of 4 channels: groups 1, 4, 4, 4
    assert [c.groups for c in m.scale_convs] == [1, 4, 4, 4]
    assert [c.groups for c in PyramidSplitAttention(256).scale_convs] == [1, 4, 8, 16]


def test_gradients_with_stride(assert_gradients, randomize):
    torch.manual_seed(0)
    m = randomize(PyramidSplitAttention(8, 16, 2, scale_groups=(1, 2, 4, 4)).double()).train()
    m(torch.randn(3, 8, 7, 6, dtype=torch.float64)).square().sum().backward()
    assert_gradients(m, "epsa")


def test_parameters():
    m = PyramidSplitAttention(64)  # parts of 16, SE hidden 1
    # convs 16 * 64 * 9 / 1 + 16 * 64 * 25 / 4 + 16 * 64 * 49 / 8 + 16 * 64 * 81 / 16,
    # SE 16 * 1 + 1 and 1 * 16 + 16
    assert count_params(m) == 9216 + 6400 + 6272 + 5184 + 17 + 32


def test_epsanet50_and_101_small_are_the_papers_counts():
    """EPSANet-50 (Small) 22.56M and EPSANet-101 (Small) 38.90M in the paper; the block keeps
    its BN after the PSA conv."""
    with torch.device("meta"):
        r50 = attnzoo.create_model("resnet50", attention="epsa")
        r101 = attnzoo.create_model("resnet101", attention="epsa")
    assert count_params(r50) == 22_561_715 and count_params(r101) == 38_900_279
    block = r50.layer2[0]
    assert isinstance(block.conv2, PyramidSplitAttention) and block.conv2.stride == 2
    assert isinstance(block.bn2, torch.nn.BatchNorm2d)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("epsa")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kernels": (3, 4, 5, 7)}, "kernels"), ({"scale_groups": (1, 2)}, "scale_groups"),
     ({"reduction": 0}, "reduction"), ({"out_channels": 18}, "divisible by the number"),
     ({"stride": 0}, "stride")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PyramidSplitAttention(16, **kwargs)
