"""Coordinate attention (attnzoo/attention/coord.py) against a float64 reference written from
its equations, element by element."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.coord import CoordAttention


def reference(x: torch.Tensor, m: CoordAttention, training: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    z_h = torch.stack([x[:, :, i, :].sum(-1) / w for i in range(h)], dim=-1)  # (N, C, H)
    z_w = torch.stack([x[:, :, :, j].sum(-1) / h for j in range(w)], dim=-1)  # (N, C, W)
    z = torch.cat([z_h, z_w], dim=-1)  # (N, C, H + W)
    w1, b1 = m.conv1.weight[:, :, 0, 0].double(), m.conv1.bias.double()
    f = torch.einsum("kc,ncp->nkp", w1, z) + b1[None, :, None]
    bn = m.bn1
    if training:
        mean = f.mean(dim=(0, 2))
        var = ((f - mean[None, :, None]) ** 2).mean(dim=(0, 2))
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    f = (f - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps)
    f = f * bn.weight.double()[None, :, None] + bn.bias.double()[None, :, None]
    f = f * torch.clamp(f + 3, 0, 6) / 6  # h-swish
    f_h, f_w = f[..., :h], f[..., h:]

    def gate(conv, g):
        wt, b = conv.weight[:, :, 0, 0].double(), conv.bias.double()
        return torch.sigmoid(torch.einsum("ck,nkp->ncp", wt, g) + b[None, :, None])

    g_h, g_w = gate(m.conv_h, f_h), gate(m.conv_w, f_w)  # (N, C, H), (N, C, W)
    return x * g_h[:, :, :, None] * g_w[:, :, None, :]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (3, 64, 4, 4), (1, 8, 1, 3)])
def test_matches_the_equations(mode, shape, randomize):
    torch.manual_seed(0)
    m = randomize(CoordAttention(shape[1])).train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    expected = reference(x, m, mode == "train")
    torch.testing.assert_close(m.double()(x), expected, rtol=1e-10, atol=1e-10)


def test_hidden_width_and_parameters():
    assert CoordAttention(64).conv1.out_channels == 8  # max(8, 64 // 32)
    assert CoordAttention(1024).conv1.out_channels == 32
    m = CoordAttention(64)
    # conv1 64*8+8, BN 2*8, conv_h and conv_w 8*64+64 each
    assert sum(p.numel() for p in m.parameters()) == 520 + 16 + 2 * 576


def test_gates_vary_along_one_axis_each():
    torch.manual_seed(0)
    g_h, g_w = CoordAttention(16).eval().gates(torch.randn(2, 16, 5, 7))
    assert g_h.shape == (2, 16, 5, 1) and g_w.shape == (2, 16, 1, 7)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("coord")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reduction": 0}, "reduction"), ({"min_hidden": 0}, "min_hidden"),
     ({"activation": "gelu"}, "activation")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoordAttention(16, **kwargs)


def test_mobilenet_v2_with_coordinate_attention_at_the_expanded_width_is_the_papers_3_95m():
    """The CA paper's MobileNetV2 + CA row (3.95M, 1000 classes) is CA after each depthwise
    conv, on the expanded width (attention_site="expanded"); at the block output it is less."""
    from attnzoo.measure import count_params

    with torch.device("meta"):
        expanded = attnzoo.create_model(
            "mobilenet_v2", attention="coord", attention_site="expanded"
        )
        output = attnzoo.create_model("mobilenet_v2", attention="coord")
    assert count_params(expanded) == 3_951_504 and round(count_params(expanded) / 1e6, 2) == 3.95
    assert count_params(output) == 3_546_310
    model = attnzoo.create_model(
        "mobilenet_v2", num_classes=10, attention="coord", attention_site="expanded", stem="cifar"
    ).train()
    out = model(torch.randn(2, 3, 32, 32))
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 2])).backward()
    block = model.features[2]  # expand 16 -> 96, depthwise, project to 24
    assert block.attention.channels == 96 and block.attention.conv1.weight.grad is not None
    with pytest.raises(ValueError, match="unknown attention_site 'inner'"):
        attnzoo.create_model("mobilenet_v2", attention="coord", attention_site="inner")
