"""HAM against the paper's Eqs. 1-10 and Algorithm 1, and its ablation switches.

The reference below follows the paper step by step, one sample at a time: Eq. 5 mix,
Eq. 6 kernel, Eq. 7 channel weights (1-D conv as an explicit loop), Eq. 8 C_im, the
top-C_im mask by sorting each sample's weights, group averages divided by the group's own
channel count, max over the masked tensor (zeros of the other group included), one shared
conv and one BN over both groups' 2N maps, ReLU, sigmoid, and F'' = A1 F'1 + A2 F'2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.attention import HAM
from attnzoo.registry import create_attention


def nearest_even(t: float) -> int:
    """|t|_even: the even integer closest to t; at a tie (t odd) the larger one."""
    below = 2 * math.floor(t / 2)
    above = below + 2
    return above if above - t <= t - below else below


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def channel_weights_by_hand(x: torch.Tensor, module: HAM) -> torch.Tensor:
    """A_C(F) (Eqs. 5-7) as an (N, C) float64 tensor."""
    n_batch, channels, height, width = x.shape
    mix = module.channel.mix
    if mix.adaptive:
        alpha, beta = sigmoid(mix.alpha_logit.item()), sigmoid(mix.beta_logit.item())
    else:
        alpha = beta = 0.5
    weight = module.channel.conv.weight.detach().double().flatten().tolist()
    k = len(weight)
    out = []
    for n in range(n_batch):
        avg = [x[n, c].double().sum().item() / (height * width) for c in range(channels)]
        mx = [x[n, c].max().item() for c in range(channels)]
        f_add = [0.5 * (avg[c] + mx[c]) + alpha * avg[c] + beta * mx[c] for c in range(channels)]
        row = []
        for c in range(channels):
            acc = 0.0
            for j in range(k):  # zero-padded 1-D conv across channels (cross-correlation)
                neighbour = c - k // 2 + j
                if 0 <= neighbour < channels:
                    acc += weight[j] * f_add[neighbour]
            row.append(sigmoid(acc))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def important_sets(weights: torch.Tensor, c_im: int) -> list[set[int]]:
    """Per sample, the indices of the C_im largest channel weights (Algorithm 1)."""
    sets = []
    for row in weights.tolist():
        order = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
        sets.append(set(order[:c_im]))
    return sets


def ham_reference(
    x: torch.Tensor, module: HAM, separation_rate: float, training: bool, bn_by_hand
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HAM with spatial='ham'. Returns (F'', batch mean, unbiased batch var) of the BN input."""
    x = x.double()
    n_batch, channels = x.shape[:2]
    weights = channel_weights_by_hand(x, module)
    refined = x * weights[:, :, None, None]  # Eq. 1
    c_im = nearest_even(channels * separation_rate)  # Eq. 8
    c_sub = channels - c_im
    important = important_sets(weights, c_im)
    conv = module.spatial.conv.weight.detach().double()
    k = conv.shape[-1]
    maps1, maps2, masks = [], [], []
    for n in range(n_batch):
        mask = torch.tensor([1.0 if c in important[n] else 0.0 for c in range(channels)])
        mask = mask.double()[:, None, None]
        group1 = refined[n] * mask  # Eq. 2: F'1 and F'2 keep the channel order
        group2 = refined[n] * (1 - mask)
        avg1 = sum(refined[n, c] for c in range(channels) if c in important[n]) / c_im
        avg2 = sum(refined[n, c] for c in range(channels) if c not in important[n]) / c_sub
        max1 = group1.max(dim=0).values  # over all C channels, zeros of group 2 included
        max2 = group2.max(dim=0).values
        maps1.append(F.conv2d(torch.stack([avg1, max1])[None], conv, padding=k // 2))
        maps2.append(F.conv2d(torch.stack([avg2, max2])[None], conv, padding=k // 2))
        masks.append(mask)
    # One BN over both groups' 2N maps (shared statistics).
    normed, mean, unbiased = bn_by_hand(torch.cat(maps1 + maps2), module.spatial.bn, training)
    attention = torch.sigmoid(torch.relu(normed))  # Phi = BN -> ReLU -> sigmoid, Eqs. 9-10
    out = torch.empty_like(x)
    for n in range(n_batch):
        a1, a2 = attention[n], attention[n_batch + n]  # (1, H, W)
        out[n] = a1 * refined[n] * masks[n] + a2 * refined[n] * (1 - masks[n])  # Eqs. 3-4
    return out, mean, unbiased


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_input(shape: tuple[int, ...], sign: str) -> torch.Tensor:
    x = torch.randn(*shape) * 2 + 0.3
    # All-negative inputs make F' negative everywhere, so each group's channel max is a
    # zero from the other group: checks that the max runs over the masked tensor.
    return -x.abs() if sign == "negative" else x


SIZES = [(2, 1, 1), (1, 7, 5), (3, 7, 5), (2, 8, 8)]


@pytest.mark.parametrize("channels", [16, 32, 64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("sign", ["mixed", "negative"])
def test_matches_reference(
    channels: int,
    size: tuple[int, int, int],
    mode: str,
    sign: str,
    randomize,
    batch_norm_by_hand,
) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(channels)).train(mode == "train")
    x = make_input((size[0], channels, *size[1:]), sign)
    expected, _, _ = ham_reference(x, module, 0.6, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_eval_mode_at_single_pixel_single_sample(randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(32)).eval()
    x = torch.randn(1, 32, 1, 1)
    expected, _, _ = ham_reference(x, module, 0.6, False, batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("separation_rate", [0.3, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference_at_other_separation_rates(
    separation_rate: float, mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(32, separation_rate=separation_rate)).train(mode == "train")
    x = torch.randn(3, 32, 6, 5)
    expected, _, _ = ham_reference(x, module, separation_rate, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_reference_kernel_and_adaptive(
    kernel_size: int, adaptive: bool, mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = HAM(32, kernel_size=kernel_size, adaptive=adaptive)
    module = randomize(module).train(mode == "train")
    x = torch.randn(2, 32, 8, 8)
    expected, _, _ = ham_reference(x, module, 0.6, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_bn_running_stats_come_from_both_groups(randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(16)).train()
    bn = module.spatial.bn
    old_mean, old_var = bn.running_mean.clone().double(), bn.running_var.clone().double()
    x = torch.randn(3, 16, 7, 5)
    _, mean, unbiased = ham_reference(x, module, 0.6, True, batch_norm_by_hand)
    module(x)
    m = bn.momentum
    torch.testing.assert_close(bn.running_mean.double()[0], (1 - m) * old_mean[0] + m * mean)
    torch.testing.assert_close(bn.running_var.double()[0], (1 - m) * old_var[0] + m * unbiased)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spatial_weights_lie_in_half_to_one(mode: str, randomize) -> None:
    """ReLU before sigmoid puts A_S in [0.5, 1): |F''| is between |F'|/2 and |F'|."""
    torch.manual_seed(0)
    module = randomize(HAM(32)).train(mode == "train")
    x = torch.randn(3, 32, 7, 5)
    refined = x.double() * channel_weights_by_hand(x, module)[:, :, None, None]
    out = module(x).double().abs()
    assert (out <= refined.abs() + 1e-6).all()
    assert (out >= 0.5 * refined.abs() - 1e-6).all()


# --- channel separation (Eq. 8, Algorithm 1) -------------------------------------------


@pytest.mark.parametrize(
    ("channels", "separation_rate", "c_im"),
    [
        (16, 0.6, 10),  # 9.6
        (32, 0.6, 20),  # 19.2
        (64, 0.6, 38),  # 38.4
        (128, 0.6, 76),  # 76.8
        (256, 0.6, 154),  # 153.6
        (64, 0.5, 32),
        (10, 0.5, 6),  # 5 is odd: the tie rounds up
        (14, 0.5, 8),  # 7 -> 8
        (18, 0.5, 10),  # 9 -> 10
        (7, 0.7, 4),  # 4.9 -> 4
        (20, 0.35, 8),  # 7 -> 8
        (3, 0.6, 2),  # 1.8 -> 2, one sub-important channel left
    ],
)
def test_important_channel_count(channels: int, separation_rate: float, c_im: int) -> None:
    torch.manual_seed(0)
    assert nearest_even(channels * separation_rate) == c_im
    module = HAM(channels, separation_rate=separation_rate)
    assert module.spatial.important == c_im
    assert module.spatial.subimportant == channels - c_im


def test_selection_is_per_sample(batch_norm_by_hand) -> None:
    """Two samples with different strong channels get different important masks."""
    torch.manual_seed(0)
    channels = 16
    module = HAM(channels).eval()
    with torch.no_grad():  # identity 1-D conv: A_C = sigmoid(F_add), monotone in F_add
        module.channel.conv.weight.copy_(torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 3))
    c_im = module.spatial.important  # 10
    x = torch.randn(2, channels, 5, 5) * 0.1
    x[0, :c_im] += 3.0  # sample 0: channels 0..9 dominate
    x[1, -c_im:] += 3.0  # sample 1: channels 6..15 dominate
    weights = module.channel(x)
    mask = module.spatial.important_mask(weights).view(2, channels)
    assert mask.sum(dim=1).tolist() == [c_im, c_im]
    assert mask[0].nonzero().flatten().tolist() == list(range(c_im))
    assert mask[1].nonzero().flatten().tolist() == list(range(channels - c_im, channels))
    assert not torch.equal(mask[0], mask[1])
    # The reference sorts each sample on its own and finds the same groups...
    assert important_sets(channel_weights_by_hand(x, module), c_im) == [
        set(range(c_im)),
        set(range(channels - c_im, channels)),
    ]
    # ...and the whole forward pass agrees with it.
    expected, _, _ = ham_reference(x, module, 0.6, False, batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "separation_rate", "c_im"), [(90, 0.7, 64), (170, 0.7, 120), (180, 0.35, 64)]
)
def test_tie_rounds_up_despite_float_error(
    channels: int, separation_rate: float, c_im: int
) -> None:
    assert HAM(channels, separation_rate=separation_rate).spatial.important == c_im


def test_tied_weights_still_select_exactly_c_im() -> None:
    module = HAM(16)
    mask = module.spatial.important_mask(torch.full((2, 16, 1, 1), 0.5))
    assert mask.flatten(1).sum(dim=1).tolist() == [10, 10]


def test_tied_weights_pick_lowest_indices() -> None:
    module = HAM(16)
    mask = module.spatial.important_mask(torch.full((1, 16, 1, 1), 0.5))
    assert mask.flatten().nonzero().flatten().tolist() == list(range(10))


@pytest.mark.parametrize("channels", [16, 32, 64])
def test_mask_takes_exactly_c_im_channels(channels: int, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(channels))
    x = torch.randn(5, channels, 4, 4)
    weights = module.channel(x)
    mask = module.spatial.important_mask(weights)
    assert mask.shape == (5, channels, 1, 1)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(dim=1) == module.spatial.important).all()
    expected = important_sets(channel_weights_by_hand(x, module), module.spatial.important)
    got = [set(row.nonzero().flatten().tolist()) for row in mask.flatten(1)]
    assert got == expected


# --- adaptive mix (Eq. 5) --------------------------------------------------------------


def test_alpha_beta_start_at_one_half() -> None:
    torch.manual_seed(0)
    mix = HAM(64).channel.mix
    assert mix.alpha.item() == 0.5
    assert mix.beta.item() == 0.5


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_alpha_beta_stay_in_unit_interval_after_large_step(direction: float) -> None:
    """A step that would move a raw alpha by far more than 1 still leaves it in (0, 1)."""
    torch.manual_seed(0)
    module = HAM(32).train()
    mix = module.channel.mix
    x = torch.randn(4, 32, 6, 6)
    (direction * module(x).sum()).backward()
    grads = [mix.alpha_logit.grad.abs().item(), mix.beta_logit.grad.abs().item()]
    assert min(grads) > 0
    # lr such that each logit moves by at least 10; on a raw alpha (d alpha = d logit / 4 at
    # init, so the raw gradient is 4x larger) that is a jump of 40: far outside (0, 1).
    lr = 10.0 / min(grads)
    with torch.no_grad():  # one plain SGD step on every parameter
        for param in module.parameters():
            param -= lr * param.grad
    assert abs(mix.alpha_logit.item()) >= 10 and abs(mix.beta_logit.item()) >= 10
    for value in (mix.alpha.item(), mix.beta.item()):
        assert 0.0 < value < 1.0
    assert torch.isfinite(module(x)).all()


def test_not_adaptive_has_no_alpha_beta(randomize, batch_norm_by_hand) -> None:
    torch.manual_seed(0)
    module = HAM(64, adaptive=False)
    names = [name for name, _ in module.named_parameters()]
    assert not any("alpha" in name or "beta" in name for name in names), names
    assert n_params(module) == 3 + 98 + 2
    # F_add = avg + max (alpha = beta = 0.5 fixed): the reference with alpha = beta = 0.5.
    randomize(module).eval()
    x = torch.randn(2, 64, 5, 5)
    expected, _, _ = ham_reference(x, module, 0.6, False, batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


# --- spatial variants ------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spatial_none_is_channel_only(adaptive: bool, mode: str, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(HAM(32, spatial=None, adaptive=adaptive)).train(mode == "train")
    assert module.spatial is None
    x = torch.randn(3, 32, 7, 5)
    expected = x.double() * channel_weights_by_hand(x, module)[:, :, None, None]
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_spatial_cbam_is_ham_channel_then_cbam_gate(
    kernel_size: int, mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = HAM(32, spatial="cbam", kernel_size=kernel_size)
    module = randomize(module).train(mode == "train")
    x = torch.randn(3, 32, 7, 5)
    refined = x.double() * channel_weights_by_hand(x, module)[:, :, None, None]
    conv = module.spatial.conv.weight.detach().double()
    assert conv.shape == (1, 2, kernel_size, kernel_size)
    # CBAM's gate: sigmoid(BN(conv([mean_c; max_c]))), no ReLU, no channel separation.
    desc = torch.stack([refined.sum(dim=1) / 32, refined.max(dim=1).values], dim=1)
    maps = F.conv2d(desc, conv, padding=kernel_size // 2)
    normed, _, _ = batch_norm_by_hand(maps, module.spatial.bn, mode == "train")
    expected = refined * torch.sigmoid(normed)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial", ["HAM", "none", "", "channel", 0])
def test_unknown_spatial_raises(spatial: object) -> None:
    with pytest.raises(ValueError, match="spatial"):
        HAM(32, spatial=spatial)  # type: ignore[arg-type]


# --- options and their errors ----------------------------------------------------------


@pytest.mark.parametrize("separation_rate", [0.0, 1.0, 1.5, -0.1])
def test_separation_rate_outside_unit_interval_raises(separation_rate: float) -> None:
    with pytest.raises(ValueError, match="separation_rate"):
        HAM(64, separation_rate=separation_rate)
    with pytest.raises(ValueError, match="separation_rate"):
        create_attention("ham", 64, separation_rate=separation_rate)


@pytest.mark.parametrize(
    ("channels", "separation_rate"),
    [
        (2, 0.6),  # 1.2 -> 2 = C: no sub-important channel
        (1, 0.6),  # 0.6 -> 0: no important channel
        (3, 0.1),  # 0.3 -> 0
        (16, 0.05),  # 0.8 -> 0
        (16, 0.95),  # 15.2 -> 16 = C
    ],
)
def test_empty_group_raises(channels: int, separation_rate: float) -> None:
    with pytest.raises(ValueError, match="C_im"):
        HAM(channels, separation_rate=separation_rate)


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_kernel_size_sets_shared_conv(kernel_size: int) -> None:
    torch.manual_seed(0)
    module = HAM(64, kernel_size=kernel_size)
    assert module.spatial.conv.weight.shape == (1, 2, kernel_size, kernel_size)
    assert module.spatial.conv.bias is None
    assert n_params(module) == 3 + 2 + 2 * kernel_size * kernel_size + 2
    x = torch.randn(2, 64, 6, 6)
    assert module(x).shape == x.shape


@pytest.mark.parametrize("kernel_size", [2, 4, 0, -1])
def test_bad_kernel_size_raises(kernel_size: int) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        HAM(64, kernel_size=kernel_size)


@pytest.mark.parametrize(
    ("channels", "eca_kernel", "k"),
    [(16, None, 3), (64, None, 3), (128, None, 5), (2048, None, 7), (64, 5, 5), (64, 1, 1)],
)
def test_channel_conv_kernel(channels: int, eca_kernel: int | None, k: int) -> None:
    torch.manual_seed(0)
    module = HAM(channels, eca_kernel=eca_kernel)
    assert module.channel.conv.weight.shape == (1, 1, k)
    assert module.channel.conv.bias is None


@pytest.mark.parametrize("eca_kernel", [2, 4, 0, -3])
def test_bad_eca_kernel_raises(eca_kernel: int) -> None:
    with pytest.raises(ValueError, match="eca_kernel"):
        HAM(64, eca_kernel=eca_kernel)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        # 1-D conv (k) + alpha, beta logits (2) + 2->1 kxk conv, no bias + BN (2)
        (64, {}, 3 + 2 + 98 + 2),  # 105
        (16, {}, 3 + 2 + 98 + 2),
        (128, {}, 5 + 2 + 98 + 2),
        (2048, {}, 7 + 2 + 98 + 2),
        (64, {"adaptive": False}, 3 + 98 + 2),
        (64, {"kernel_size": 3}, 3 + 2 + 18 + 2),
        (64, {"kernel_size": 5}, 3 + 2 + 50 + 2),
        (64, {"spatial": None}, 3 + 2),
        (64, {"spatial": "cbam"}, 3 + 2 + 98 + 2),
        (64, {"eca_kernel": 9}, 9 + 2 + 98 + 2),
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    torch.manual_seed(0)
    assert n_params(create_attention("ham", channels, **kwargs)) == expected


def test_parameter_count_literal() -> None:
    assert n_params(HAM(64)) == 105


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_of_64(mode: str) -> None:
    torch.manual_seed(0)
    module = HAM(32).train(mode == "train")
    x = torch.randn(64, 32, 8, 8)
    out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
