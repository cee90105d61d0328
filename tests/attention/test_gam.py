"""GAM against Liu et al. Eqs. 1-2 and Figs. 2-3, its options and parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.attention.gam import GAM, channel_shuffle
from attnzoo.registry import create_attention

RESNET20_PARAMS = 269_722


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_by_hand(t: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    """Per-channel BN of t (N, C, H, W) in float64, one channel at a time."""
    out = torch.empty_like(t)
    for c in range(t.shape[1]):
        values = t[:, c].flatten()
        if training:
            mean = values.sum() / values.numel()
            var = ((values - mean) ** 2).sum() / values.numel()
        else:
            mean = bn.running_mean[c].double()
            var = bn.running_var[c].double()
        gamma, beta = bn.weight[c].detach().double(), bn.bias[c].detach().double()
        out[:, c] = (t[:, c] - mean) / torch.sqrt(var + bn.eps) * gamma + beta
    return out


def shuffle_by_hand(t: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet: output channel j * groups + g takes input channel g * (C / groups) + j."""
    per_group = t.shape[1] // groups
    order = [0] * t.shape[1]
    for g in range(groups):
        for j in range(per_group):
            order[j * groups + g] = g * per_group + j
    return t[:, order]


def max_pool3x3_by_hand(t: torch.Tensor) -> torch.Tensor:
    """3x3 max over each pixel's neighbourhood (stride 1, borders padded with -inf)."""
    _, _, height, width = t.shape
    out = torch.empty_like(t)
    for i in range(height):
        for j in range(width):
            window = t[:, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2]
            out[:, :, i, j] = window.amax(dim=(2, 3))
    return out


def channel_map_by_hand(x: torch.Tensor, module: GAM) -> torch.Tensor:
    """M_c (Fig. 2): the MLP on every pixel's C-vector, then a sigmoid."""
    w1 = module.channel_fc1.weight.detach().double()
    b1 = module.channel_fc1.bias.detach().double()
    w2 = module.channel_fc2.weight.detach().double()
    b2 = module.channel_fc2.bias.detach().double()
    n_batch, _, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        for i in range(height):
            for j in range(width):
                hidden = torch.relu(w1 @ x[n, :, i, j] + b1)
                out[n, :, i, j] = torch.sigmoid(w2 @ hidden + b2)
    return out


def spatial_map_by_hand(x: torch.Tensor, module: GAM, training: bool) -> torch.Tensor:
    """M_s (Fig. 3): conv7x7 -> BN -> ReLU -> shuffle -> conv7x7 -> BN -> sigmoid."""
    if module.pool:
        x = max_pool3x3_by_hand(x)
    conv1, conv2 = module.spatial_conv1, module.spatial_conv2
    g = module.groups
    b1 = None if conv1.bias is None else conv1.bias.detach().double()
    b2 = None if conv2.bias is None else conv2.bias.detach().double()
    hidden = F.conv2d(x, conv1.weight.detach().double(), b1, padding=3, groups=g)
    hidden = torch.relu(bn_by_hand(hidden, module.spatial_bn1, training))
    hidden = shuffle_by_hand(hidden, g)
    logits = F.conv2d(hidden, conv2.weight.detach().double(), b2, padding=3, groups=g)
    if isinstance(module.spatial_bn2, nn.BatchNorm2d):
        logits = bn_by_hand(logits, module.spatial_bn2, training)
    return torch.sigmoid(logits)


def gam_reference(x: torch.Tensor, module: GAM, training: bool) -> torch.Tensor:
    f = x.double()
    if module.channel_fc1 is not None:
        f = channel_map_by_hand(f, module) * f  # Eq. 1
    if module.use_spatial:
        f = spatial_map_by_hand(f, module, training) * f  # Eq. 2
    return f


SIZES = [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((3, 7, 5), "train")]
SIZES += [(size, "eval") for size, mode in SIZES if mode == "train"]


@pytest.mark.parametrize(("size", "mode"), SIZES, ids=[f"{s}-{m}" for s, m in SIZES])
@pytest.mark.parametrize("channels", [16, 64])
def test_matches_reference(channels: int, size: tuple[int, int, int], mode: str, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(GAM(channels)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = gam_reference(x, module, mode == "train")
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"groups": 4},
        {"pool": True},
        {"groups": 4, "pool": True},
        {"channel": False},
        {"spatial": False},
        {"conv_bias": False, "out_bn": False},
        {"reduction": 4, "groups": 2},
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_options_match_reference(kwargs: dict, mode: str, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(GAM(64, **kwargs)).train(mode == "train")
    x = torch.randn(2, 64, 6, 5) * 2 + 0.5
    expected = gam_reference(x, module, mode == "train")
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_channel_sigmoid_is_there() -> None:
    """M_c lies in (0, 1) although the raw MLP output does not (the copied code's bug)."""
    torch.manual_seed(0)
    module = GAM(32)
    x = torch.randn(3, 32, 7, 5) * 3
    raw = module.channel_fc2(F.relu(module.channel_fc1(x.permute(0, 2, 3, 1))))
    assert ((raw < 0) | (raw > 1)).any(), "raw MLP output should leave (0, 1) for this test"
    gate = module.channel_attention(x)
    assert gate.shape == x.shape
    assert (gate > 0).all() and (gate < 1).all()
    torch.testing.assert_close(gate, torch.sigmoid(raw.permute(0, 3, 1, 2)))


def test_spatial_map_lies_in_unit_interval() -> None:
    torch.manual_seed(0)
    module = GAM(32).train()
    gate = module.spatial_attention(torch.randn(3, 32, 7, 5))
    assert gate.shape == (3, 32, 7, 5)
    assert (gate > 0).all() and (gate < 1).all()


@pytest.mark.parametrize(("channels", "groups"), [(8, 2), (12, 4), (16, 4), (6, 3)])
def test_channel_shuffle_is_a_permutation(channels: int, groups: int) -> None:
    x = torch.arange(2 * channels * 3, dtype=torch.float32).view(2, channels, 3, 1)
    y = channel_shuffle(x, groups)
    assert y.shape == x.shape
    # Every channel appears exactly once.
    taken = sorted(int(y[0, c, 0, 0].item()) // 3 for c in range(channels))
    assert taken == list(range(channels))
    torch.testing.assert_close(y, shuffle_by_hand(x, groups))
    # Shuffling with C / groups groups undoes it.
    torch.testing.assert_close(channel_shuffle(y, channels // groups), x)


def test_channel_shuffle_with_one_group_is_identity() -> None:
    x = torch.randn(2, 8, 3, 3)
    assert channel_shuffle(x, 1) is x


def test_group_conv_with_shuffle_mixes_all_groups() -> None:
    """With the shuffle every channel of M_s depends on every input group of channels.

    C = 256, r = 16, groups = 4: 16 hidden channels, 4 per group, so after the shuffle
    each group of conv2 holds one hidden channel from every group of conv1.
    """
    torch.manual_seed(0)
    module = GAM(256, groups=4, channel=False).eval()
    assert module.spatial_conv1.weight.shape == (16, 64, 7, 7)
    assert module.spatial_conv2.weight.shape == (256, 4, 7, 7)
    x = torch.randn(1, 256, 5, 5)
    with torch.no_grad():
        base = module.spatial_attention(x)
        for g in range(4):
            bumped = x.clone()
            bumped[:, g * 64 : (g + 1) * 64] += 1.0
            changed = (module.spatial_attention(bumped) - base).abs().amax(dim=(0, 2, 3))
            assert (changed > 0).all(), f"input group {g} does not reach every output channel"


def test_one_hidden_channel_per_group_cannot_mix() -> None:
    """C // r == groups: the shuffle is the identity, so groups stay apart (documented)."""
    torch.manual_seed(0)
    module = GAM(64, groups=4, channel=False).eval()
    x = torch.randn(1, 64, 5, 5)
    with torch.no_grad():
        bumped = x.clone()
        bumped[:, :16] += 1.0
        changed = (module.spatial_attention(bumped) - module.spatial_attention(x)).abs()
    assert changed[:, 16:].max() == 0


SWEEP = [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((1, 7, 5), "eval")]
SWEEP += [((3, 7, 5), "train"), ((3, 7, 5), "eval"), ((2, 8, 8), "train")]


@pytest.mark.parametrize(("size", "mode"), SWEEP, ids=[f"{s}-{m}" for s, m in SWEEP])
def test_shape_sweep(size: tuple[int, int, int], mode: str) -> None:
    """Batch 1 at 1x1 only in eval mode: BN cannot take batch statistics from one value."""
    torch.manual_seed(0)
    module = GAM(32, groups=2, pool=True).train(mode == "train")
    x = torch.randn(size[0], 32, *size[1:])
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_gradients_reach_every_parameter(assert_gradients) -> None:
    """In eval mode every parameter gets a gradient. In train mode so does every one
    except the conv biases right before a BN, which batch statistics cancel exactly."""
    torch.manual_seed(0)
    x = torch.randn(3, 32, 7, 5)
    x = x.double()
    for mode in ("eval", "train"):  # float64: the cancelled biases' noise stays ~1e-16
        module = GAM(32).train(mode == "train").double()
        out = module(x)
        (out * torch.randn_like(out)).sum().backward()
        assert_gradients(module, "gam")  # the conv biases before BN: zero in train mode
    module = GAM(32, conv_bias=False, out_bn=False, groups=2, pool=True).train().double()
    x = x.clone().requires_grad_(True)
    module(x).pow(2).sum().backward()
    assert_gradients(module, "gam", zero={})
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_autocast(mode: str) -> None:
    torch.manual_seed(0)
    module = GAM(32, groups=2).train(mode == "train")
    x = torch.randn(2, 32, 8, 8)
    reference = copy.deepcopy(module)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("kwargs", [{}, {"groups": 4, "pool": True}])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_matches_contiguous(kwargs: dict, mode: str) -> None:
    torch.manual_seed(0)
    module = GAM(64, **kwargs).train(mode == "train")
    twin = copy.deepcopy(module)
    x = torch.randn(3, 64, 7, 5)
    out = module(x)
    out_last = twin(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        # C=64, h=4. MLP 64*4+4 + 4*64+64 = 580; conv1 49*64*4+4 = 12,548; BN1 8;
        # conv2 49*4*64+64 = 12,608; BN2 128.
        (64, {}, 580 + 12_548 + 8 + 12_608 + 128),  # 25,872
        # groups=4: conv1 49*16*4+4 = 3,140; conv2 49*1*64+64 = 3,200
        (64, {"groups": 4}, 580 + 3_140 + 8 + 3_200 + 128),  # 7,056
        (64, {"pool": True}, 25_872),  # the max-pool has no parameters
        (64, {"spatial": False}, 580),
        (64, {"channel": False}, 12_548 + 8 + 12_608 + 128),
        (64, {"conv_bias": False, "out_bn": False}, 580 + 12_544 + 8 + 12_544),
        # r=4: h=16. MLP 64*16+16 + 16*64+64; conv1 49*64*16+16; BN1 32; conv2 49*16*64+64
        (64, {"reduction": 4}, 1_040 + 1_088 + 50_192 + 32 + 50_240 + 128),  # 102,720
        # C=16, h=1: MLP 16+1 + 16+16; conv1 49*16+1; BN1 2; conv2 49*16+16; BN2 32
        (16, {}, 49 + 785 + 2 + 800 + 32),  # 1,668
        # C=256, h=16: 100*C*h + 4h + 4C
        (256, {}, 409_600 + 64 + 1_024),  # 410,688
        (2048, {}, 100 * 2048 * 128 + 4 * 128 + 4 * 2048),
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    with torch.device("meta"):  # no memory, no init: only the shapes are counted
        module = GAM(channels, **kwargs)
    assert n_params(module) == expected


def test_default_reduction_is_16() -> None:
    module = create_attention("gam", 64)
    assert module.channel_fc1.out_features == 4
    assert module.spatial_conv1.out_channels == 4


def test_resnet20_parameter_delta() -> None:
    # 3 blocks at each width: 3 * (1,668 + 6,536 + 25,872)
    model = attnzoo.create_model("resnet20", attention="gam")
    assert n_params(model) == RESNET20_PARAMS + 3 * (1_668 + 6_536 + 25_872)


def test_resnet20_trains() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="gam").train()
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


@pytest.mark.parametrize(
    ("channels", "kwargs", "match"),
    [
        (64, {"groups": 3}, "groups"),  # 3 does not divide 64
        (64, {"groups": 8}, "groups"),  # 8 divides 64 but not C // r = 4
        (16, {"groups": 4}, "groups"),  # C // r = 1
        (64, {"groups": 0}, "groups"),
        (64, {"groups": 2.0}, "groups"),
        (64, {"reduction": 0}, "reduction"),
        (64, {"reduction": -4}, "reduction"),
        (64, {"channel": False, "spatial": False}, "channel"),
    ],
)
def test_bad_options_raise(channels: int, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GAM(channels, **kwargs)


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="rate"):
        create_attention("gam", 64, rate=4)


def test_wrong_input_raises() -> None:
    with pytest.raises(ValueError, match="64"):
        GAM(64)(torch.randn(2, 32, 5, 5))
