"""Gather-Excite (attnzoo/attention/ge.py) against a float64 reference written from the
paper's gather / excite definitions and the official schemas, with explicit loops for the
pooling windows, the depthwise convolutions, BN and the nearest-neighbour interpolation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.attention.ge import GatherExcite


def average_windows(x: torch.Tensor, e: int) -> torch.Tensor:
    """theta^-: windows of 2e - 1 centred on rows / columns 0, e, 2e, ..., averaged over the
    positions inside the map; ceil(H / e) x ceil(W / e) outputs."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, math.ceil(h / e), math.ceil(w / e), dtype=x.dtype)
    for p in range(out.shape[2]):
        rows = range(max(0, p * e - (e - 1)), min(h, p * e + e))
        for q in range(out.shape[3]):
            cols = range(max(0, q * e - (e - 1)), min(w, q * e + e))
            window = x[:, :, rows.start : rows.stop, cols.start : cols.stop]
            out[:, :, p, q] = window.sum(dim=(2, 3)) / (len(rows) * len(cols))
    return out


def depthwise_stride2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """3 x 3 depthwise conv, stride 2, zero padding 1, no bias."""
    n, c, h, w = x.shape
    weight = conv.weight.detach().double()[:, 0]  # (C, 3, 3)
    padded = torch.zeros(n, c, h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(n, c, math.ceil(h / 2), math.ceil(w / 2), dtype=x.dtype)
    for p in range(out.shape[2]):
        for q in range(out.shape[3]):
            for a in range(3):
                for b in range(3):
                    out[:, :, p, q] += weight[None, :, a, b] * padded[:, :, 2 * p + a, 2 * q + b]
    return out


def depthwise_global(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A depthwise conv whose kernel covers the whole map: one value per channel."""
    weight = conv.weight.detach().double()[:, 0]  # (C, H, W)
    return (x * weight[None]).sum(dim=(2, 3), keepdim=True)


def batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    if training:  # batch statistics over N, H, W, biased variance
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    normed = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    return (
        normed * bn.weight.detach().double()[None, :, None, None]
        + bn.bias.detach().double()[None, :, None, None]
    )


def nearest(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Nearest-neighbour interpolation to h x w: output row i reads row floor(i h' / h)."""
    hh, ww = x.shape[2:]
    rows = [i * hh // h for i in range(h)]
    cols = [j * ww // w for j in range(w)]
    return x[:, :, rows][:, :, :, cols]


def reference(x: torch.Tensor, m: GatherExcite, training: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    convs = [layer for layer in (m.gather_layers or []) if isinstance(layer, nn.Conv2d)]
    bns = [layer for layer in (m.gather_layers or []) if isinstance(layer, nn.BatchNorm2d)]
    if m.variant == "theta_minus":
        gathered = (
            x.mean(dim=(2, 3), keepdim=True) if m.extent is None else average_windows(x, m.extent)
        )
    elif m.extent is None:
        gathered = batch_norm(depthwise_global(x, convs[0]), bns[0], training)
    else:
        gathered = x
        for step, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
            gathered = batch_norm(depthwise_stride2(gathered, conv), bn, training)
            if step < len(convs) - 1:
                gathered = gathered.clamp_min(0)
    if m.variant == "theta_plus":
        down, up = m.excite_mlp[0], m.excite_mlp[2]
        hidden = (
            torch.einsum(
                "kc,ncpq->nkpq", down.weight.detach().double()[:, :, 0, 0], gathered.clamp_min(0)
            )
            + down.bias.detach().double()[None, :, None, None]
        )
        gathered = (
            torch.einsum(
                "ck,nkpq->ncpq", up.weight.detach().double()[:, :, 0, 0], hidden.clamp_min(0)
            )
            + up.bias.detach().double()[None, :, None, None]
        )
    gate = 1 / (1 + torch.exp(-nearest(gathered, h, w)))
    return x * gate


CASES = [
    ({}, (2, 16, 7, 5)),
    ({}, (1, 8, 1, 1)),
    ({"extent": 2}, (2, 16, 7, 5)),
    ({"extent": 4}, (2, 8, 9, 6)),
    ({"extent": 4}, (3, 4, 5, 5)),
    ({"extent": 8}, (2, 8, 7, 5)),
    ({"extent": 8}, (1, 4, 1, 1)),
    ({"extent": 2}, (2, 8, 1, 1)),
    ({"variant": "theta", "extent": 2}, (2, 16, 7, 5)),
    ({"variant": "theta", "extent": 4}, (3, 8, 9, 6)),
    ({"variant": "theta", "extent": 8}, (2, 8, 7, 5)),
    ({"variant": "theta", "extent": 2}, (2, 4, 1, 1)),
    ({"variant": "theta", "feat_size": (7, 5)}, (3, 8, 7, 5)),
    ({"variant": "theta_plus", "extent": 2}, (2, 16, 7, 5)),
    ({"variant": "theta_plus", "extent": 8}, (3, 32, 9, 9)),
    ({"variant": "theta_plus", "feat_size": 4, "reduction": 4}, (2, 16, 4, 4)),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("kwargs", "shape"), CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_matches_the_equations(mode, kwargs, shape, randomize):
    training = mode == "train"
    if training and shape[0] == 1 and kwargs.get("variant", "theta_minus") != "theta_minus":
        pytest.skip("BN takes no batch statistics of one value per channel")
    torch.manual_seed(0)
    m = randomize(GatherExcite(shape[1], **kwargs)).double().train(training)
    x = torch.randn(*shape, dtype=torch.float64) + 0.3
    expected = reference(x, m, training)
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 1e-2


def test_global_theta_minus_fused_gradient_matches_the_reference():
    torch.manual_seed(0)
    m = GatherExcite(16)
    x = torch.randn(2, 16, 7, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.randn(2, 16, 7, 5, dtype=torch.float64)
    (m(x) * weights).sum().backward()
    (reference(x_ref, m, True) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)


def test_extent_windows_overlap_as_the_official_schema():
    """E8 gathers with a 15 x 15 average pool of stride 8: the value gathered for position
    (0, 0) of a 16 x 16 map averages rows and columns 0..7, the next one rows 1..15."""
    x = torch.arange(16.0).repeat(16, 1).view(1, 1, 16, 16)  # value = column index
    gathered = GatherExcite(1, extent=8).gather(x)
    assert gathered.shape == (1, 1, 2, 2)
    torch.testing.assert_close(gathered[0, 0, 0], torch.tensor([3.5, 8.0]))


@pytest.mark.parametrize("extent", [2, 4, 8])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (3, 9), (16, 16)])
def test_gathered_size_is_the_ceiling(extent, size):
    x = torch.randn(2, 4, *size)
    for variant in ("theta_minus", "theta", "theta_plus"):
        gathered = GatherExcite(4, variant=variant, extent=extent).gather(x)
        assert gathered.shape[2:] == (math.ceil(size[0] / extent), math.ceil(size[1] / extent))


def test_same_as_timm_parameter_free():
    gather_excite = pytest.importorskip("timm.layers.gather_excite")
    x = torch.randn(2, 16, 9, 13)
    for extent in (0, 2, 4, 8):
        theirs = gather_excite.GatherExcite(16, extent=extent, use_mlp=False)
        ours = GatherExcite(16, extent=extent)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameters():
    assert n_params(GatherExcite(64)) == 0
    assert n_params(GatherExcite(64, extent=8)) == 0
    # theta, extent 8: three depthwise 3x3 (9 C) each with BN (2 C)
    assert n_params(GatherExcite(64, variant="theta", extent=8)) == 3 * (9 * 64 + 2 * 64)
    # theta, global on 7 x 5: a 7x5 depthwise kernel per channel and one BN
    assert n_params(GatherExcite(64, variant="theta", feat_size=(7, 5))) == 35 * 64 + 2 * 64
    # theta_plus, extent 2: one depthwise 3x3 + BN, then 64 -> 4 -> 64 with biases
    assert n_params(GatherExcite(64, variant="theta_plus", extent=2)) == (
        9 * 64 + 2 * 64 + (64 * 4 + 4) + (4 * 64 + 64)
    )


def test_resnet50_parameters():
    from attnzoo.measure import count_params

    with torch.device("meta"):
        plain = count_params(attnzoo.create_model("resnet50"))
        free = count_params(attnzoo.create_model("resnet50", attention="ge"))
        theta8 = count_params(
            attnzoo.create_model(
                "resnet50", attention="ge", attention_kwargs={"variant": "theta", "extent": 8}
            )
        )
    assert free == plain == 25_557_032
    # 3 (9 C + 2 C) per block, summed C = 3*256 + 4*512 + 6*1024 + 3*2048 = 15,104
    assert theta8 == plain + 33 * 15_104
    # The global theta / theta^+ of the official prototxts, built per block at 224 x 224
    # (maps 56, 28, 14, 7): C H W + 2 C per block, plus SE's MLP for theta^+.
    stages = [(256, 56, 3), (512, 28, 4), (1024, 14, 6), (2048, 7, 3)]
    theta = sum(
        count * n_params(GatherExcite(c, variant="theta", feat_size=s)) for c, s, count in stages
    )
    plus = sum(
        count * n_params(GatherExcite(c, variant="theta_plus", feat_size=s))
        for c, s, count in stages
    )
    assert theta == 5_549_568 and plain + theta == 31_106_600
    assert plus - theta == 2_530_992  # the same C -> C/16 -> C MLPs as SE-ResNet-50
    assert plain + plus == 33_637_592


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("ge")
    assert losses[-1] < losses[0]
    losses = losses_in_resnet20("ge", variant="theta_plus", extent=4)
    assert losses[-1] < losses[0]


def test_learned_variants_get_gradients(randomize, assert_gradients):
    for kwargs in (
        {"variant": "theta", "extent": 4},
        {"variant": "theta_plus", "extent": 2},
        {"variant": "theta_plus", "feat_size": (7, 5)},
    ):
        torch.manual_seed(0)
        m = randomize(GatherExcite(16, **kwargs)).double().train()
        x = torch.randn(3, 16, 7, 5, dtype=torch.float64)
        out = m(x)
        (out * torch.randn_like(out)).sum().backward()
        assert_gradients(m, "ge", zero={})


def test_global_learned_gather_rejects_another_size():
    m = GatherExcite(8, variant="theta", feat_size=(7, 5))
    with pytest.raises(ValueError, match="7x5"):
        m(torch.randn(2, 8, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"variant": "theta+"}, "variant"), ({"variant": "minus"}, "variant"),
     ({"extent": 3}, "extent"), ({"extent": 1}, "extent"), ({"extent": -2}, "extent"),
     ({"extent": True}, "extent"), ({"extent": 2.0}, "extent"), ({"extent": "8"}, "extent"),
     ({"variant": "theta"}, "feat_size"), ({"variant": "theta_plus", "extent": 0}, "feat_size"),
     ({"feat_size": 7}, "feat_size"), ({"variant": "theta", "extent": 2, "feat_size": 7}, "feat_size"),
     ({"variant": "theta", "feat_size": (7, 0)}, "feat_size"),
     ({"variant": "theta", "feat_size": (7, 5, 1)}, "feat_size"),
     ({"reduction": 0}, "reduction")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatherExcite(16, **kwargs)
