"""CBAM against Woo et al. Eqs. 1-3 (plus BN in the spatial gate) and its options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.attention import CBAM
from attnzoo.registry import create_attention


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def mlp_by_hand(module: CBAM, v: list[float]) -> list[float]:
    """The shared C -> C/r -> C MLP (with biases, ReLU) applied to one C-vector."""
    first, _, second = module.mlp
    w1 = first.weight.detach().double().flatten(1).tolist()
    b1 = first.bias.detach().double().tolist()
    w2 = second.weight.detach().double().flatten(1).tolist()
    b2 = second.bias.detach().double().tolist()
    channels, hidden = len(w2), len(w1)
    h = [max(0.0, sum(w1[j][c] * v[c] for c in range(channels)) + b1[j]) for j in range(hidden)]
    return [sum(w2[c][j] * h[j] for j in range(hidden)) + b2[c] for c in range(channels)]


def channel_refined(x: torch.Tensor, module: CBAM) -> torch.Tensor:
    """F' = M_c(F) * F (Eqs. 1-2), or with HAM's adaptive mix when the module has one."""
    n_batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        avg = [x[n, c].sum().item() / (height * width) for c in range(channels)]
        mx = [x[n, c].max().item() for c in range(channels)]
        if not module.max_pool:
            logits = mlp_by_hand(module, avg)  # GAM's "wmp": no max-pooled descriptor
        elif module.mix is None:
            # Eq. 2: the MLP runs on each descriptor, the outputs are summed.
            mlp_avg, mlp_max = mlp_by_hand(module, avg), mlp_by_hand(module, mx)
            logits = [mlp_avg[c] + mlp_max[c] for c in range(channels)]
        else:
            # HAM Eq. 5: F_add = 1/2 (avg + max) + alpha avg + beta max, one MLP pass.
            alpha = sigmoid(module.mix.alpha_logit.item())
            beta = sigmoid(module.mix.beta_logit.item())
            f_add = [
                0.5 * (avg[c] + mx[c]) + alpha * avg[c] + beta * mx[c] for c in range(channels)
            ]
            logits = mlp_by_hand(module, f_add)
        for c in range(channels):
            out[n, c] = sigmoid(logits[c]) * x[n, c]
    return out


def spatial_refined(
    refined: torch.Tensor, module: CBAM, training: bool, bn_by_hand
) -> torch.Tensor:
    """F'' = sigmoid(BN(conv_kxk([mean_c F'; max_c F']))) * F' (Eqs. 1 and 3)."""
    n_batch, channels = refined.shape[:2]
    gate = module.spatial
    weight = gate.conv.weight.detach().double()
    k = weight.shape[-1]
    maps = []
    for n in range(n_batch):
        avg = sum(refined[n, c] for c in range(channels)) / channels
        mx = refined[n].max(dim=0).values
        desc = torch.stack([avg, mx] if gate.max_pool else [avg])[None]  # (1, 2, H, W): [avg; max]
        maps.append(F.conv2d(desc, weight, padding=k // 2))
    normed, _, _ = bn_by_hand(torch.cat(maps), gate.bn, training)
    return refined * torch.sigmoid(normed)


def cbam_reference(x: torch.Tensor, module: CBAM, training: bool, bn_by_hand) -> torch.Tensor:
    refined = channel_refined(x.double(), module)
    if module.spatial is None:
        return refined
    return spatial_refined(refined, module, training, bn_by_hand)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


SIZES = [(2, 1, 1), (1, 7, 5), (3, 7, 5), (2, 8, 8)]


@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference(
    channels: int, size: tuple[int, int, int], mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = randomize(CBAM(channels)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = cbam_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_eval_mode_at_single_pixel_single_sample(randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = randomize(CBAM(32)).eval()
    x = torch.randn(1, 32, 1, 1)
    expected = cbam_reference(x, module, False, batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_train_mode_updates_running_stats_from_batch(randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = randomize(CBAM(16)).train()
    bn = module.spatial.bn
    old_mean, old_var = bn.running_mean.clone().double(), bn.running_var.clone().double()
    x = torch.randn(3, 16, 7, 5)
    refined = channel_refined(x.double(), module)
    weight = module.spatial.conv.weight.detach().double()
    desc = torch.stack([refined.mean(dim=1), refined.amax(dim=1)], dim=1)
    _, mean, unbiased = batch_norm_by_hand(F.conv2d(desc, weight, padding=3), bn, True)
    module(x)
    m = bn.momentum
    torch.testing.assert_close(bn.running_mean.double()[0], (1 - m) * old_mean[0] + m * mean)
    torch.testing.assert_close(bn.running_var.double()[0], (1 - m) * old_var[0] + m * unbiased)


@pytest.mark.parametrize("channels", [16, 64])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channel_only(channels: int, mode: str, randomize) -> None:
    """spatial=False: x * sigmoid(mlp(avg) + mlp(max)), no spatial parameters."""
    torch.manual_seed(0)
    module = randomize(CBAM(channels, spatial=False)).train(mode == "train")
    assert module.spatial is None
    x = torch.randn(3, channels, 7, 5) * 2 + 0.5
    expected = channel_refined(x.double(), module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_adaptive_starts_at_one_half_and_equals_single_pass_of_sum() -> None:
    """At init alpha = beta = sigmoid(0) = 0.5, so F_add = avg + max fed to the MLP once."""
    torch.manual_seed(0)
    module = CBAM(32, spatial=False, adaptive=True)
    assert module.mix.alpha.item() == 0.5
    assert module.mix.beta.item() == 0.5
    x = torch.randn(3, 32, 7, 5)
    f_add = (x.double().mean(dim=(2, 3)) + x.double().amax(dim=(2, 3))).tolist()
    logits = torch.tensor([mlp_by_hand(module, f_add[n]) for n in range(3)], dtype=torch.float64)
    expected = torch.sigmoid(logits)[:, :, None, None] * x.double()
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adaptive_matches_reference(
    spatial: bool, mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = randomize(CBAM(32, spatial=spatial, adaptive=True)).train(mode == "train")
    assert module.mix.alpha_logit.item() != 0.0  # randomised away from the init
    x = torch.randn(3, 32, 7, 5) * 2 + 0.5
    expected = cbam_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_adaptive_alpha_beta_get_gradients(randomize) -> None:
    torch.manual_seed(0)
    # Random weights and r = 4 (8 hidden units): at C = 32, r = 16 the MLP has 2 hidden units,
    # and with PyTorch's init both can be dead (ReLU) for a whole batch, which zeroes every
    # gradient upstream of the MLP. That is the tiny width, not the mix.
    module = randomize(CBAM(32, reduction=4, adaptive=True)).train()
    out = module(torch.randn(3, 32, 7, 5))
    (out * torch.randn_like(out)).sum().backward()
    for param in (module.mix.alpha_logit, module.mix.beta_logit):
        assert param.grad is not None and param.grad.abs() > 0


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_kernel_size(kernel_size: int, mode: str, randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = randomize(CBAM(32, kernel_size=kernel_size)).train(mode == "train")
    assert module.spatial.conv.weight.shape == (1, 2, kernel_size, kernel_size)
    assert module.spatial.conv.bias is None
    x = torch.randn(2, 32, 8, 8) * 2 + 0.5
    expected = cbam_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size", [2, 4, 0, -1])
def test_bad_kernel_size_raises(kernel_size: int) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        CBAM(32, kernel_size=kernel_size)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # MLP at C=64, r=16: 64*4 + 4 + 4*64 + 64 = 580; 7x7 conv 2->1 no bias 98; BN 2
        ({}, 580 + 98 + 2),
        ({"spatial": False}, 580),
        ({"adaptive": True}, 580 + 2 + 98 + 2),
        ({"adaptive": True, "spatial": False}, 580 + 2),
        ({"kernel_size": 3}, 580 + 18 + 2),
        ({"kernel_size": 5}, 580 + 50 + 2),
        ({"rd_rule": "round8"}, 64 * 8 + 8 + 8 * 64 + 64 + 98 + 2),
        ({"reduction": 8}, 64 * 8 + 8 + 8 * 64 + 64 + 98 + 2),
    ],
)
def test_parameter_count_at_64(kwargs: dict, expected: int) -> None:
    torch.manual_seed(0)
    assert n_params(create_attention("cbam", 64, **kwargs)) == expected


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        (16, 16 * 1 + 1 + 1 * 16 + 16 + 100),  # 149
        (32, 32 * 2 + 2 + 2 * 32 + 32 + 100),  # 262
        (256, 256 * 16 + 16 + 16 * 256 + 256 + 100),  # 8564
    ],
)
def test_parameter_count_by_width(channels: int, expected: int) -> None:
    torch.manual_seed(0)
    assert n_params(CBAM(channels)) == expected


@pytest.mark.parametrize("spatial", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_max_pooling_matches_reference(spatial, mode, randomize, batch_norm_by_hand):
    torch.manual_seed(0)
    module = randomize(CBAM(32, reduction=4, spatial=spatial, max_pool=False))
    module.train(mode == "train")
    x = torch.randn(3, 32, 5, 6)
    expected = cbam_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)
    # One input channel fewer in the 7x7 conv than with max-pooling.
    assert n_params(CBAM(32, max_pool=False)) == n_params(CBAM(32)) - 49
    with pytest.raises(ValueError, match="needs max_pool"):
        CBAM(32, adaptive=True, max_pool=False)


@pytest.mark.parametrize("name", ["cbam", "triplet"])
def test_official_bn_momentum_option(name: str) -> None:
    """bn_momentum=0.01 (the official code's): after one training batch from zero running
    means, each BN's running mean is 0.01 x the batch mean, a tenth of the default's."""
    torch.manual_seed(0)
    default = create_attention(name, 16).train()
    official = create_attention(name, 16, bn_momentum=0.01).train()
    official.load_state_dict(default.state_dict())
    x = torch.randn(4, 16, 8, 8) + 1.0
    torch.testing.assert_close(official(x), default(x))  # training output: batch statistics
    bns = [(a, b) for a, b in zip(default.modules(), official.modules(), strict=True)
           if isinstance(a, torch.nn.BatchNorm2d)]  # fmt: skip
    assert bns
    for a, b in bns:
        assert b.momentum == 0.01 and a.momentum == 0.1
        assert a.running_mean.abs().max() > 1e-4
        torch.testing.assert_close(b.running_mean, a.running_mean / 10, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_max_mean_pool_order_with_swapped_conv_channels(
    mode: str, kernel_size: int, randomize
) -> None:
    """pool_order="max_mean" (the official [max; mean]) with the spatial conv's two input
    channels swapped computes what the default "mean_max" module does."""
    torch.manual_seed(0)
    ours = randomize(CBAM(32, kernel_size=kernel_size)).train(mode == "train")
    official = CBAM(32, kernel_size=kernel_size, pool_order="max_mean").train(mode == "train")
    state = ours.state_dict()
    state["spatial.conv.weight"] = state["spatial.conv.weight"].flip(1)
    official.load_state_dict(state)
    assert official.spatial.pool_order == "max_mean"
    assert not torch.equal(official.spatial.conv.weight, ours.spatial.conv.weight)
    for shape in [(3, 32, 7, 5), (2, 32, 20, 20)]:  # the plain and the banded conv path
        x = torch.randn(shape) * 2 + 0.5
        torch.testing.assert_close(official(x), ours(x), atol=1e-6, rtol=1e-5)
    # Unswapped, the two orders differ.
    official.load_state_dict(ours.state_dict())
    x = torch.randn(3, 32, 7, 5)
    assert not torch.allclose(official(x), ours(x), atol=1e-4)


def test_bad_pool_order_raises() -> None:
    with pytest.raises(ValueError, match="pool_order"):
        CBAM(32, pool_order="max_avg")
