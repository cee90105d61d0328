"""The global context block (attnzoo/attention/gc.py) against a float64 reference written
from the paper's GC block, one sample and one position at a time."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.gc import GlobalContextBlock


def conv1x1(conv: torch.nn.Conv2d, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv applied to one vector v (C_in,)."""
    weight = conv.weight.detach().double().flatten(1)
    return weight @ v + conv.bias.detach().double()


def reference(x: torch.Tensor, m: GlobalContextBlock) -> torch.Tensor:
    """alpha_j = exp(W_k x_j) / sum_m exp(W_k x_m), c = sum_j alpha_j x_j (or the mean of
    x_j), t = W_v2 ReLU(LN(W_v1 c)), z_i = x_i + t (or x_i * sigmoid(t))."""
    n_batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        positions = [x[n, :, i, j] for i in range(height) for j in range(width)]
        if m.pooling == "att":
            logits = torch.stack([conv1x1(m.context_conv, p)[0] for p in positions])
            exps = torch.exp(logits - logits.max())
            alphas = exps / exps.sum()
            context = sum(a * p for a, p in zip(alphas, positions, strict=True))
        else:
            context = sum(positions) / len(positions)
        conv1, norm, _, conv2 = m.transform
        h = conv1x1(conv1, context)
        mean = h.sum() / h.numel()
        var = ((h - mean) ** 2).sum() / h.numel()
        h = (h - mean) / torch.sqrt(var + norm.eps)
        h = h * norm.weight.detach().double().flatten() + norm.bias.detach().double().flatten()
        t = conv1x1(conv2, torch.clamp(h, min=0))
        if m.fusion == "add":
            out[n] = x[n] + t[:, None, None]
        else:
            out[n] = x[n] / (1 + torch.exp(-t[:, None, None]))
    return out


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 16, 7, 5), (1, 32, 1, 1), (3, 20, 4, 6)])
@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusion", ["add", "mul"])
def test_matches_the_equations(mode, shape, pooling, fusion, randomize):
    torch.manual_seed(0)
    m = GlobalContextBlock(shape[1], pooling=pooling, fusion=fusion)
    m = randomize(m).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64) * 2
    expected = reference(x, m)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_attention_pooling_differs_from_average_pooling(randomize):
    """The softmax weights matter: with the same transform, "att" and "avg" disagree."""
    torch.manual_seed(0)
    att = randomize(GlobalContextBlock(16)).double()
    avg = GlobalContextBlock(16, pooling="avg").double()
    avg.transform.load_state_dict(att.transform.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    assert (att(x) - avg(x)).abs().max() > 1e-3


def test_starts_as_identity_for_add_and_half_for_mul():
    """W_v2 starts at zero (the official code's last_zero_init)."""
    x = torch.randn(2, 16, 5, 3)
    torch.testing.assert_close(GlobalContextBlock(16)(x), x)
    torch.testing.assert_close(GlobalContextBlock(16, fusion="mul")(x), x / 2)


def test_bias_of_the_context_conv_never_changes_the_output(randomize):
    """The softmax over positions ignores a constant added to every logit (the reason for its
    entry in conftest.ZERO_GRADIENT_BY_CONSTRUCTION)."""
    torch.manual_seed(0)
    m = randomize(GlobalContextBlock(16)).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    before = m(x)
    with torch.no_grad():
        m.context_conv.bias.add_(3.0)
    torch.testing.assert_close(m(x), before, rtol=1e-12, atol=1e-12)


def test_hidden_width():
    assert GlobalContextBlock(256).transform[0].out_channels == 16  # 256 // 16
    assert GlobalContextBlock(2048).transform[0].out_channels == 128
    assert GlobalContextBlock(256, reduction=4).transform[0].out_channels == 64
    assert GlobalContextBlock(16).transform[0].out_channels == 8  # min_hidden
    assert GlobalContextBlock(16, min_hidden=1).transform[0].out_channels == 1


def test_parameter_count():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    # C = 64, hidden max(8, 4) = 8: W_k 64 + 1, W_v1 64*8 + 8, LN 2*8, W_v2 8*64 + 64
    assert count(GlobalContextBlock(64)) == 65 + 520 + 16 + 576
    # avg pooling has no W_k
    assert count(GlobalContextBlock(64, pooling="avg")) == 520 + 16 + 576
    # C = 256, hidden 16: 257 + (4096 + 16) + 32 + (4096 + 256)
    assert count(GlobalContextBlock(256)) == 257 + 4112 + 32 + 4352


def test_resnet50_parameters():
    """Every block (default): 28,105,032. Without layer1's three modules (c3-c5 only, the
    official detection placement) it is 28,078,773, i.e. 28.08M."""
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="gc")
    assert count_params(model) == 28_105_032
    layer1 = sum(
        p.numel()
        for k, p in model.named_parameters()
        if k.startswith("layer1.") and "attention" in k
    )
    assert count_params(model) - layer1 == 28_078_773


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("gc")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"reduction": 0}, "reduction"), ({"reduction": float("nan")}, "reduction"),
     ({"reduction": True}, "reduction"), ({"min_hidden": 0}, "min_hidden"),
     ({"pooling": "max"}, "pooling"), ({"fusion": "both"}, "fusion")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalContextBlock(16, **kwargs)
