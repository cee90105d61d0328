"""The double attention block (attnzoo/attention/a2.py) against a float64 reference written
from A^2-Nets' gathering and distribution steps, one position and one descriptor at a time."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.a2 import DoubleAttention
from attnzoo.registry import default_placement


def conv1x1(conv: torch.nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of one sample's features a (C_in, P) as a matrix product."""
    return conv.weight.detach().double().flatten(1) @ a + conv.bias.detach().double()[:, None]


def reference(x: torch.Tensor, m: DoubleAttention) -> torch.Tensor:
    """g_j = sum_i A_i b_ji with b_j a softmax over the positions i; Z_i = sum_j v_ji g_j with
    v_i a softmax over the descriptors j; out = X + conv_out(Z)."""
    n_batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        a = x[n].reshape(channels, -1)
        features = conv1x1(m.feature_conv, a)  # A (c_m, P)
        maps = conv1x1(m.gather_conv, a)  # B (c_n, P)
        vectors = conv1x1(m.distribute_conv, a)  # V (c_n, P)
        c_n, positions = maps.shape
        descriptors = []
        for j in range(c_n):
            e = torch.exp(maps[j] - maps[j].max())
            b_j = e / e.sum()  # over the positions
            descriptors.append(sum(features[:, i] * b_j[i] for i in range(positions)))
        z = torch.empty(features.shape[0], positions, dtype=x.dtype)
        for i in range(positions):
            e = torch.exp(vectors[:, i] - vectors[:, i].max())
            v_i = e / e.sum()  # over the descriptors
            z[:, i] = sum(v_i[j] * descriptors[j] for j in range(c_n))
        out[n] = x[n] + conv1x1(m.out_conv, z).reshape(channels, height, width)
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (2, 32, 1, 1), (1, 20, 4, 6)])
@pytest.mark.parametrize("reductions", [(4, 4), (2, 8), (16, 1)])
def test_matches_the_equations(mode, shape, reductions, randomize):
    torch.manual_seed(0)
    m = DoubleAttention(
        shape[1], feature_reduction=reductions[0], descriptor_reduction=reductions[1]
    )
    m = randomize(m).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) * 2
    expected = reference(x, m)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_distribution_weights_matter(randomize):
    """Swapping the softmax axes of B and V (a common bug, see the module docstring) gives a
    different output: the reference test can tell them apart."""
    torch.manual_seed(0)
    m = randomize(DoubleAttention(16)).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    a = m.feature_conv(x).flatten(2)
    b = torch.softmax(m.gather_conv(x).flatten(2), dim=1)  # over descriptors: wrong
    v = torch.softmax(m.distribute_conv(x).flatten(2), dim=1)
    wrong = x + m.out_conv((a @ b.transpose(1, 2) @ v).view(2, -1, 5, 5))
    assert (m(x) - wrong).abs().max() > 1e-3


def test_bias_of_the_gathering_maps_never_changes_the_output(randomize):
    """Each map's softmax over positions ignores a constant added to the whole map
    (conftest.ZERO_GRADIENT_BY_CONSTRUCTION)."""
    torch.manual_seed(0)
    m = randomize(DoubleAttention(16)).double()
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    before = m(x)
    with torch.no_grad():
        m.gather_conv.bias.add_(torch.arange(4, dtype=torch.float64))
    torch.testing.assert_close(m(x), before, rtol=1e-12, atol=1e-12)


def test_widths_and_parameter_count():
    m = DoubleAttention(64)
    assert (m.feature_conv.out_channels, m.gather_conv.out_channels) == (16, 16)
    assert DoubleAttention(2).feature_conv.out_channels == 1  # max(1, 2 // 4)
    # C = 64, c_m = c_n = 16: A, B, V 3 * (64*16 + 16), conv_out 16*64 + 64
    assert sum(p.numel() for p in m.parameters()) == 3 * 1040 + 1088
    from attnzoo.measure import count_params

    assert default_placement("a2") == "stage"
    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="a2")
        every_block = attnzoo.create_model("resnet50", attention="a2", placement="block")
    assert [s.channels for s in model.stage_attention] == [256, 512, 1024]
    assert count_params(model) == 26_936_424
    # Over the abstract's bound (under 0.6 x ResNet-152's 60.2M): see the module docstring.
    assert count_params(every_block) == 45_703_016


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("a2")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"feature_reduction": 0}, "feature_reduction"),
     ({"feature_reduction": float("nan")}, "feature_reduction"),
     ({"descriptor_reduction": -1}, "descriptor_reduction"),
     ({"descriptor_reduction": None}, "descriptor_reduction")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoubleAttention(16, **kwargs)
