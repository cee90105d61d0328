"""Polarized self-attention (attnzoo/attention/polarized.py) against a float64 reference
written from the paper's channel-only and spatial-only branches and its two layouts, one
position at a time and in the paper's order of operations (convs before pooling)."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.polarized import PolarizedSelfAttention


def weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    assert conv.bias is None
    return conv.weight.detach().double().flatten(1)


def softmax(v: torch.Tensor) -> torch.Tensor:
    e = torch.exp(v - v.max())
    return e / e.sum()


def sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-v))


def channel_weights(a: torch.Tensor, m: PolarizedSelfAttention) -> torch.Tensor:
    """A^ch = sigmoid(LN(W_z (W_v X softmax_HW(W_q X)))) for one sample a (C, P): (C,)."""
    positions = a.shape[1]
    logits = torch.stack([weight(m.channel_query)[0] @ a[:, i] for i in range(positions)])
    p = softmax(logits)
    values = [weight(m.channel_value) @ a[:, i] for i in range(positions)]  # W_v x_i
    z = weight(m.channel_out) @ sum(p[i] * values[i] for i in range(positions))
    norm = m.channel_norm
    mean = z.sum() / z.numel()
    var = ((z - mean) ** 2).sum() / z.numel()
    z = (z - mean) / torch.sqrt(var + norm.eps)
    z = z * norm.weight.detach().double().flatten() + norm.bias.detach().double().flatten()
    return sigmoid(z)


def spatial_weights(a: torch.Tensor, m: PolarizedSelfAttention) -> torch.Tensor:
    """A^sp_i = sigmoid(softmax_C/2(GAP(W_q X)) . W_v x_i) for one sample a (C, P): (P,)."""
    positions = a.shape[1]
    queries = [weight(m.spatial_query) @ a[:, i] for i in range(positions)]
    s = softmax(sum(queries) / positions)  # over the C/2 channels
    return torch.stack([sigmoid(s @ (weight(m.spatial_value) @ a[:, i])) for i in range(positions)])


def reference(x: torch.Tensor, m: PolarizedSelfAttention) -> torch.Tensor:
    n_batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        a = x[n].reshape(channels, -1)
        a_ch = channel_weights(a, m)[:, None]
        if m.layout == "parallel":
            result = a_ch * a + spatial_weights(a, m)[None, :] * a  # Z^ch + Z^sp
        else:
            y = a_ch * a  # Z^ch
            result = spatial_weights(y, m)[None, :] * y  # Z^sp(Z^ch)
        out[n] = result.reshape(channels, height, width)
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (2, 32, 1, 1), (1, 20, 4, 6), (3, 9, 2, 3)])
@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_matches_the_equations(mode, shape, layout, randomize):
    torch.manual_seed(0)
    m = randomize(PolarizedSelfAttention(shape[1], layout=layout)).double()
    m.train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) * 2
    expected = reference(x, m)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_the_layouts_differ(randomize):
    torch.manual_seed(0)
    parallel = randomize(PolarizedSelfAttention(16)).double()
    sequential = PolarizedSelfAttention(16, layout="sequential").double()
    sequential.load_state_dict(parallel.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    assert (parallel(x) - sequential(x)).abs().max() > 1e-2


def test_the_official_codes_spatial_softmax_is_not_the_papers(randomize):
    """The official PSA_p normalises over the HW positions after the product (no softmax on
    the pooled query); the paper, and the module, over the C/2 channels before it."""
    torch.manual_seed(0)
    m = randomize(PolarizedSelfAttention(16)).double()
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    pooled_query = m.spatial_query(x).mean(dim=(2, 3)).unsqueeze(1)  # (N, 1, C/2)
    code = torch.sigmoid(torch.softmax(pooled_query @ m.spatial_value(x).flatten(2), dim=-1))
    assert (m.spatial_weights(x).flatten(1) - code.flatten(1)).abs().max() > 1e-2


def test_parameter_count():
    # C = 64, C/2 = 32: channel W_q 64, W_v 64*32, W_z 32*64, LN 2*64; spatial W_q, W_v 64*32
    m = PolarizedSelfAttention(64)
    assert sum(p.numel() for p in m.parameters()) == 64 + 2048 + 2048 + 128 + 2048 + 2048
    assert PolarizedSelfAttention(1).channel_value.out_channels == 1  # max(1, 1 // 2)
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="polarized")
    assert count_params(model) == 65_841_448


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("polarized")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("layout", ["serial", "p", None])
def test_bad_layout(layout):
    with pytest.raises(ValueError, match="layout"):
        PolarizedSelfAttention(16, layout=layout)
