"""Triplet attention against Misra et al.'s three-branch definition, options and counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.attention.triplet import TripletAttention, ZPoolGate
from attnzoo.registry import create_attention

RESNET20_PARAMS = 269_722


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gate_by_hand(desc: torch.Tensor, gate: ZPoolGate, training: bool, bn_by_hand) -> torch.Tensor:
    """sigmoid(BN(conv_kxk(desc))) for a Z-pool descriptor stack desc (N, 2, rows, cols)."""
    weight = gate.conv.weight.detach().double()
    maps = F.conv2d(desc, weight, padding=weight.shape[-1] // 2)
    normed, _, _ = bn_by_hand(maps, gate.bn, training)
    return torch.sigmoid(normed)[:, 0]  # (N, rows, cols)


def triplet_reference(
    x: torch.Tensor, module: TripletAttention, training: bool, bn_by_hand
) -> torch.Tensor:
    """Each branch written by the axes it pools and the (rows, cols) map it gates with."""
    x = x.double()
    n_batch, channels, height, width = x.shape
    # Branch 1, C-H interaction: pool over W, map rows = H, cols = C.
    desc = torch.zeros(n_batch, 2, height, channels, dtype=torch.float64)
    for n in range(n_batch):
        for c in range(channels):
            for h in range(height):
                row = x[n, c, h, :]
                desc[n, 0, h, c] = row.max()
                desc[n, 1, h, c] = row.sum() / width
    g1 = gate_by_hand(desc, module.channel_height, training, bn_by_hand)  # (N, H, C)
    # Branch 2, C-W interaction: pool over H, map rows = C, cols = W.
    desc = torch.zeros(n_batch, 2, channels, width, dtype=torch.float64)
    for n in range(n_batch):
        for c in range(channels):
            for w in range(width):
                col = x[n, c, :, w]
                desc[n, 0, c, w] = col.max()
                desc[n, 1, c, w] = col.sum() / height
    g2 = gate_by_hand(desc, module.channel_width, training, bn_by_hand)  # (N, C, W)
    # Branch 3, H-W: pool over C.
    g3 = None
    if module.height_width is not None:
        desc = torch.zeros(n_batch, 2, height, width, dtype=torch.float64)
        for n in range(n_batch):
            for h in range(height):
                for w in range(width):
                    fibre = x[n, :, h, w]
                    desc[n, 0, h, w] = fibre.max()
                    desc[n, 1, h, w] = fibre.sum() / channels
        g3 = gate_by_hand(desc, module.height_width, training, bn_by_hand)  # (N, H, W)
    out = torch.empty_like(x)
    for n in range(n_batch):
        for c in range(channels):
            y1 = x[n, c] * g1[n, :, c][:, None]
            y2 = x[n, c] * g2[n, c, :][None, :]
            if g3 is None:
                out[n, c] = (y1 + y2) / 2
            else:
                out[n, c] = (y1 + y2 + x[n, c] * g3[n]) / 3
    return out


SIZES = [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((3, 7, 5), "train")]
SIZES += [(size, "eval") for size, mode in SIZES if mode == "train"]


@pytest.mark.parametrize(("size", "mode"), SIZES, ids=[f"{s}-{m}" for s, m in SIZES])
@pytest.mark.parametrize(("channels", "no_spatial"), [(13, False), (16, True)])
def test_matches_reference(
    channels: int,
    size: tuple[int, int, int],
    mode: str,
    no_spatial: bool,
    randomize,
    batch_norm_by_hand,
) -> None:
    torch.manual_seed(0)
    module = randomize(TripletAttention(channels, no_spatial=no_spatial)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = triplet_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_kernel_size_matches_reference(
    kernel_size: int, mode: str, randomize, batch_norm_by_hand
) -> None:
    torch.manual_seed(0)
    module = randomize(TripletAttention(16, kernel_size=kernel_size)).train(mode == "train")
    x = torch.randn(2, 16, 9, 6) * 2 + 0.5
    expected = triplet_reference(x, module, mode == "train", batch_norm_by_hand)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_rotation_equals_transpose_with_flipped_kernel(mode: str, randomize) -> None:
    """A 90-degree rotation is a transpose plus a flip; flipping the map and the kernel
    together flips the gate's output, so rotating instead of transposing only re-indexes
    the kernel (the docstring's claim)."""
    torch.manual_seed(0)
    gate = randomize(ZPoolGate(7)).train(mode == "train")
    flipped = copy.deepcopy(gate)
    with torch.no_grad():
        flipped.conv.weight.copy_(gate.conv.weight.flip(-1))
    x = torch.randn(3, 8, 6, 5)
    torch.testing.assert_close(flipped(x.flip(-1)).flip(-1), gate(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("size", "mode"),
    [((1, 1, 1), "eval"), ((2, 1, 1), "train"), ((1, 7, 5), "train"), ((1, 7, 5), "eval")]
    + [((3, 7, 5), "train"), ((3, 7, 5), "eval"), ((2, 8, 8), "train")],
)
def test_shape_sweep(size: tuple[int, int, int], mode: str) -> None:
    """Batch 1 at 1x1 only in eval mode: BN cannot take batch statistics from one value."""
    torch.manual_seed(0)
    module = TripletAttention(32).train(mode == "train")
    x = torch.randn(size[0], 32, *size[1:])
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("no_spatial", [False, True])
def test_gradients_reach_every_parameter(mode: str, no_spatial: bool, assert_gradients) -> None:
    torch.manual_seed(0)
    module = TripletAttention(16, no_spatial=no_spatial).train(mode == "train")
    module = module.double()
    x = torch.randn(3, 16, 7, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    params = dict(module.named_parameters())
    assert len(params) == (6 if no_spatial else 9)  # conv weight, BN weight, BN bias
    assert_gradients(module, "triplet")
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bfloat16_autocast(mode: str) -> None:
    torch.manual_seed(0)
    module = TripletAttention(32).train(mode == "train")
    x = torch.randn(2, 32, 8, 8)
    reference = copy.deepcopy(module)(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_matches_contiguous(no_spatial: bool, mode: str) -> None:
    torch.manual_seed(0)
    module = TripletAttention(32, no_spatial=no_spatial).train(mode == "train")
    twin = copy.deepcopy(module)
    x = torch.randn(3, 32, 7, 5)
    out = module(x)
    out_last = twin(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 3 * (2 * 7 * 7 + 2)),  # three branches: 7x7 conv 2 -> 1, no bias, BN(1)
        ({"no_spatial": True}, 2 * (2 * 7 * 7 + 2)),
        ({"kernel_size": 3}, 3 * (2 * 3 * 3 + 2)),
        ({"kernel_size": 5, "no_spatial": True}, 2 * (2 * 5 * 5 + 2)),
    ],
)
@pytest.mark.parametrize("channels", [16, 2048])
def test_parameter_count_does_not_depend_on_channels(
    channels: int, kwargs: dict, expected: int
) -> None:
    assert n_params(TripletAttention(channels, **kwargs)) == expected


def test_resnet20_trains() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="triplet").train()
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
    assert n_params(model) == RESNET20_PARAMS + 9 * 300


@pytest.mark.parametrize("kernel_size", [0, -3, 2, 4, 3.0, True])
def test_bad_kernel_size_raises(kernel_size: object) -> None:
    with pytest.raises(ValueError, match="kernel_size"):
        TripletAttention(16, kernel_size=kernel_size)  # type: ignore[arg-type]


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="reduction"):
        create_attention("triplet", 16, reduction=16)


def test_wrong_input_raises() -> None:
    with pytest.raises(ValueError, match="16"):
        TripletAttention(16)(torch.randn(2, 15, 5, 5))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("no_spatial", [False, True])
def test_mean_max_pool_order_with_swapped_conv_channels(
    mode: str, no_spatial: bool, randomize
) -> None:
    """pool_order="mean_max" with every branch's conv input channels swapped computes what the
    default "max_mean" (paper and official code: [max; mean]) module does."""
    torch.manual_seed(0)
    ours = randomize(TripletAttention(16, no_spatial=no_spatial)).train(mode == "train")
    other = TripletAttention(16, no_spatial=no_spatial, pool_order="mean_max")
    other.train(mode == "train")
    state = {k: v.flip(1) if k.endswith("conv.weight") else v for k, v in ours.state_dict().items()}
    other.load_state_dict(state)
    for shape in [(3, 16, 7, 5), (2, 16, 20, 20)]:  # the plain and the banded conv path
        x = torch.randn(shape) * 2 + 0.5
        torch.testing.assert_close(other(x), ours(x), atol=1e-6, rtol=1e-5)
    other.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16, 7, 5)
    assert not torch.allclose(other(x), ours(x), atol=1e-4)


def test_bad_pool_order_raises() -> None:
    with pytest.raises(ValueError, match="pool_order"):
        TripletAttention(16, pool_order="avg_max")
