"""BAM against Park et al. Eqs. 1-4 (official-code layer layout), its options and counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.attention.bam import BAM, SingleSampleSafeBatchNorm1d
from attnzoo.registry import create_attention

RESNET20_PARAMS = 269_722


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_by_hand(t: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, batch_stats: bool):
    """Per-channel BN of t (N, C) or (N, C, H, W) in float64, one channel at a time."""
    out = torch.empty_like(t)
    for c in range(t.shape[1]):
        values = t[:, c].flatten()
        if batch_stats:
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
        else:
            mean = bn.running_mean[c].double()
            var = bn.running_var[c].double()
        gamma, beta = bn.weight[c].detach().double(), bn.bias[c].detach().double()
        out[:, c] = (t[:, c] - mean) / torch.sqrt(var + bn.eps) * gamma + beta
    return out


def channel_logits_by_hand(x: torch.Tensor, module: BAM, training: bool) -> torch.Tensor:
    """M_c (Eq. 3, official layout): FC -> BN -> ReLU -> FC [-> BN], on the channel means.

    The vector BNs use batch statistics in training mode when the batch has two or more
    samples, and running statistics otherwise (our fix for a batch of one).
    """
    fc0, bn0, _, fc1 = module.channel_mlp
    n_batch, channels, height, width = x.shape
    batch_stats = training and n_batch > 1
    z = torch.stack(
        [
            torch.stack([x[n, c].sum() / (height * width) for c in range(channels)])
            for n in range(n_batch)
        ]
    )  # (N, C): AvgPool
    hidden = z @ fc0.weight.detach().double().T + fc0.bias.detach().double()
    hidden = torch.relu(bn_by_hand(hidden, bn0, batch_stats))
    logits = hidden @ fc1.weight.detach().double().T + fc1.bias.detach().double()
    if isinstance(module.channel_bn, nn.BatchNorm1d):
        logits = bn_by_hand(logits, module.channel_bn, batch_stats)
    return logits


def spatial_logits_by_hand(x: torch.Tensor, module: BAM, training: bool) -> torch.Tensor:
    """M_s (Eq. 4, official layout): 1x1 -> [3x3 dilated] x2 -> 1x1, BN + ReLU between."""
    convs = [m for m in module.spatial if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.spatial if isinstance(m, nn.BatchNorm2d)]
    t = x
    for i, conv in enumerate(convs):
        w, b = conv.weight.detach().double(), conv.bias.detach().double()
        if i in (1, 2):
            d = conv.dilation[0]
            t = F.conv2d(t, w, b, padding=d, dilation=d)
        else:
            t = F.conv2d(t, w, b)
        if i < 3:
            t = torch.relu(bn_by_hand(t, bns[i], training))
    if len(bns) == 4:  # output_bn
        t = bn_by_hand(t, bns[3], training)
    return t


def bam_reference(x: torch.Tensor, module: BAM, training: bool) -> torch.Tensor:
    f = x.double()
    mc = channel_logits_by_hand(f, module, training)  # (N, C)
    ms = spatial_logits_by_hand(f, module, training)  # (N, 1, H, W)
    out = torch.empty_like(f)
    for n in range(f.shape[0]):
        for c in range(f.shape[1]):
            m = torch.sigmoid(mc[n, c] + ms[n, 0])  # Eq. 2
            out[n, c] = f[n, c] + f[n, c] * m  # Eq. 1
    return out


SIZES = [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((3, 7, 5), "train")]
SIZES += [(size, "eval") for size, mode in SIZES if mode == "train"]


@pytest.mark.parametrize(("size", "mode"), SIZES, ids=[f"{s}-{m}" for s, m in SIZES])
@pytest.mark.parametrize(("channels", "output_bn"), [(16, False), (64, False), (48, True)])
def test_matches_reference(
    channels: int, size: tuple[int, int, int], mode: str, output_bn: bool, randomize
) -> None:
    torch.manual_seed(0)
    module = randomize(BAM(channels, output_bn=output_bn)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = bam_reference(x, module, mode == "train")
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"reduction": 4}, {"dilation": 1}, {"dilation": 2}])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_options_match_reference(kwargs: dict, mode: str, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(BAM(64, **kwargs)).train(mode == "train")
    x = torch.randn(2, 64, 9, 6) * 2 + 0.5
    expected = bam_reference(x, module, mode == "train")
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_branches_are_added_not_multiplied(randomize) -> None:
    """M(F) = sigmoid(M_c + M_s) (Eq. 2), not the 1 + sigmoid(M_c * M_s) of one code version."""
    torch.manual_seed(0)
    module = randomize(BAM(32)).eval()
    x = torch.randn(2, 32, 6, 6)
    mc, ms = module.channel_attention(x), module.spatial_attention(x)
    assert mc.shape == (2, 32, 1, 1) and ms.shape == (2, 1, 6, 6)
    torch.testing.assert_close(module(x), x * (1 + torch.sigmoid(mc + ms)))
    assert not torch.allclose(module(x), x * (1 + torch.sigmoid(mc * ms)))


def test_output_lies_between_one_and_two_times_input() -> None:
    torch.manual_seed(0)
    module = BAM(32).train()
    x = torch.rand(3, 32, 7, 5) + 0.1  # positive, so out / x is the factor 1 + M(F)
    factor = module(x) / x
    assert (factor > 1).all() and (factor < 2).all()


def test_single_sample_training_uses_running_stats_of_vector_bns(randomize) -> None:
    """Batch of one in training mode: the BatchNorm1d layers fall back to their running
    statistics and leave them alone; the spatial BatchNorm2d layers still use the batch."""
    torch.manual_seed(0)
    module = randomize(BAM(32, output_bn=True)).train()
    x = torch.randn(1, 32, 7, 5)
    vector_bns = [m for m in module.modules() if isinstance(m, SingleSampleSafeBatchNorm1d)]
    map_bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(vector_bns) == 2 and len(map_bns) == 4
    vector_before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in vector_bns]
    map_before = [bn.running_mean.clone() for bn in map_bns]
    expected = bam_reference(x, module, training=True)
    out = module(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for bn, (mean, var) in zip(vector_bns, vector_before, strict=True):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert all(
        not torch.equal(bn.running_mean, m) for bn, m in zip(map_bns, map_before, strict=True)
    )
    # Gradients flow through the fallback (with running statistics nothing cancels them).
    (out * torch.randn_like(out)).sum().backward()
    assert module.channel_mlp[3].bias.grad.abs().sum() > 0
    assert module.channel_bn.weight.grad.abs().sum() > 0


def test_vector_bn_is_plain_batchnorm_for_two_or_more_samples() -> None:
    torch.manual_seed(0)
    ours, plain = SingleSampleSafeBatchNorm1d(6), nn.BatchNorm1d(6)
    x = torch.randn(4, 6) * 3 + 1
    torch.testing.assert_close(ours(x), plain(x))
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)
    ours.eval(), plain.eval()
    torch.testing.assert_close(ours(x[:1]), plain(x[:1]))


@pytest.mark.parametrize(
    ("size", "mode"),
    [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((1, 7, 5), "eval")]
    + [((3, 7, 5), "train"), ((3, 7, 5), "eval"), ((2, 8, 8), "train")],
)
def test_shape_sweep(size: tuple[int, int, int], mode: str) -> None:
    """Batch 1 at 1x1 only in eval mode: BN2d cannot take batch statistics from one value."""
    torch.manual_seed(0)
    module = BAM(32, output_bn=True).train(mode == "train")
    x = torch.randn(size[0], 32, *size[1:])
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("output_bn", [False, True])
def test_gradients_reach_every_parameter(
    mode: str, output_bn: bool, assert_gradients, zero_gradients
) -> None:
    """Conv and FC biases followed by a BN get no gradient in training mode (exactly zero in
    exact arithmetic, so checked in float64); every other parameter gets a real one."""
    torch.manual_seed(0)
    module = BAM(32, output_bn=output_bn).train(mode == "train").double()
    x = torch.randn(3, 32, 7, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    zero = zero_gradients("bam", mode == "train")
    if output_bn and mode == "train":
        zero |= {p: "train mode: a BN follows it" for p in ("channel_mlp.3.bias", "spatial.9.bias")}
    assert_gradients(module, "bam", zero)
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_autocast(mode: str) -> None:
    torch.manual_seed(0)
    module = BAM(32).train(mode == "train")
    x = torch.randn(2, 32, 8, 8)
    reference = copy.deepcopy(module)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("output_bn", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_matches_contiguous(output_bn: bool, mode: str) -> None:
    torch.manual_seed(0)
    module = BAM(64, output_bn=output_bn).train(mode == "train")
    twin = copy.deepcopy(module)
    x = torch.randn(3, 64, 7, 5)
    out = module(x)
    out_last = twin(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        # C=64, h=4. Channel: FC 64*4+4, BN1d 8, FC 4*64+64 -> 588.
        # Spatial: 1x1 64*4+4, BN 8, two 3x3 4->4 (9*16+4 each) with BN 8, 1x1 4+1 -> 585.
        (64, {}, 588 + 585),
        (64, {"output_bn": True}, 588 + 585 + 2 * 64 + 2),
        (64, {"dilation": 2}, 588 + 585),
        # C=16, h=1: channel 16+1 + 2 + 16+16; spatial 16+1 + 2 + 2 * (9+1 + 2) + 1+1
        (16, {}, 51 + 45),
        # C=256, h=16: channel 4,096+16 + 32 + 4,096+256; spatial 4,096+16 + 32
        # + 2 * (2,304+16 + 32) + 16+1
        (256, {}, 8_496 + 8_865),
        # r=4 at 64: h=16. Channel 64*16+16 + 32 + 16*64+64; spatial 64*16+16 + 32
        # + 2 * (9*256+16 + 32) + 16+1
        (64, {"reduction": 4}, 2_160 + 1_072 + 4_704 + 17),
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    assert n_params(BAM(channels, **kwargs)) == expected


def test_resnet50_stage_boundaries_match_paper_count() -> None:
    """Three BAMs at C = 256, 512, 1024 add 358,067: ResNet-50's 25,557,032 -> 25.92M."""
    with torch.device("meta"):
        added = sum(n_params(BAM(c)) for c in (256, 512, 1024))
    assert added == 358_067
    assert round((25_557_032 + added) / 1e6, 2) == 25.92


def test_resnet20_trains() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="bam").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # BAM's own placement: one module at each of the two stage boundaries (16, 32 channels).
    assert n_params(model) == RESNET20_PARAMS + n_params(BAM(16)) + n_params(BAM(32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": 0}, "reduction"),
        ({"reduction": -16}, "reduction"),
        ({"dilation": 0}, "dilation"),
        ({"dilation": 1.5}, "dilation"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BAM(64, **kwargs)


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="combine must be 'sum' .Eq. 2. or 'product'"):
        create_attention("bam", 64, combine="multiply")


def test_the_official_codes_product_form(randomize) -> None:
    """combine="product": F (1 + sigmoid(M_c M_s)), as Jongchan/attention-module computes it,
    from the same two branches (float64 reference written from that line of the code)."""
    torch.manual_seed(0)
    module = randomize(BAM(32, combine="product")).eval().double()
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64)
    mc, ms = module.channel_attention(x), module.spatial_attention(x)
    torch.testing.assert_close(module(x), x * (1 + torch.sigmoid(mc * ms)))
    paper = BAM(32).eval().double()
    paper.load_state_dict(module.state_dict())  # same parameters: only the combination differs
    assert (paper(x) - module(x)).abs().max() > 1e-3


def test_backbones_put_bam_at_the_stage_boundaries_by_default() -> None:
    """BAM's paper places it where the network downsamples; ResNet-50 is then 25.92M."""
    model = attnzoo.create_model("resnet50", attention="bam")
    assert round(n_params(model) / 1e6, 2) == 25.92
    assert not any(isinstance(m, BAM) for m in model.layer1.modules())  # no per-block BAM
    block = attnzoo.create_model("resnet50", attention="bam", placement="block")
    assert n_params(block) == 30_771_496
    assert attnzoo.registry.default_placement("bam") == "stage"
    assert attnzoo.registry.default_placement("se") == "block"
    assert attnzoo.registry.default_placement(None) == "block"


def test_wrong_input_raises() -> None:
    with pytest.raises(ValueError, match="64"):
        BAM(64)(torch.randn(2, 32, 5, 5))
