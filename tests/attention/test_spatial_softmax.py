"""Spatial softmax attention against Sec. 3.1 of the attention-based CNN paper: conv
logits, a softmax over all H W positions, element-wise weighting; and its options."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import attnzoo
from attnzoo.attention.spatial_softmax import SpatialSoftmaxAttention
from attnzoo.registry import create_attention


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_by_hand(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of one sample x (C, H, W) with weight (1, C, k, k), zero padding
    k // 2, written as a sum over kernel offsets; returns (H, W) in float64."""
    _, height, width = x.shape
    k = weight.shape[-1]
    pad = k // 2
    padded = torch.zeros(x.shape[0], height + 2 * pad, width + 2 * pad, dtype=torch.float64)
    padded[:, pad : pad + height, pad : pad + width] = x
    out = torch.zeros(height, width, dtype=torch.float64)
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy : dy + height, dx : dx + width]
            out += torch.einsum("c,chw->hw", weight[0, :, dy, dx].double(), window)
    return out


def reference(x: torch.Tensor, module: SpatialSoftmaxAttention) -> torch.Tensor:
    """logits = conv(F); a = exp(logits) / sum over all H W positions; F' = a * F."""
    x = x.double()
    n_batch, _, height, width = x.shape
    weight = module.conv.weight.detach().double()
    out = torch.empty_like(x)
    for n in range(n_batch):
        logits = conv_by_hand(x[n], weight)
        exps = torch.exp(logits - logits.max())
        a = exps / exps.sum()  # sums to one over the H W positions
        if module.scale_to_mean_one:
            a = a * (height * width)
        weighted = a[None] * x[n]  # one map, broadcast over the channels
        out[n] = x[n] + weighted if module.residual else weighted
    return out


SIZES = [(1, 1, 1), (2, 6, 5), (1, 7, 5), (3, 4, 4), (2, 1, 6)]
OPTIONS = [
    {},
    {"kernel_size": 1},
    {"kernel_size": 5},
    {"scale_to_mean_one": False},
    {"residual": True},
    {"residual": True, "scale_to_mean_one": False},
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("channels", "kwargs"), [(32, {})] + [(16, o) for o in OPTIONS])
def test_matches_reference(
    channels: int, size: tuple[int, int, int], mode: str, kwargs: dict, randomize
) -> None:
    torch.manual_seed(0)
    module = randomize(SpatialSoftmaxAttention(channels, **kwargs)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 2 + 0.5
    expected = reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [True, False])
def test_weights_sum_to_one_or_to_the_position_count(scale: bool, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(SpatialSoftmaxAttention(16, scale_to_mean_one=scale))
    x = torch.randn(3, 16, 6, 5)
    a = module.attention_map(x)
    assert a.shape == (3, 1, 6, 5) and (a > 0).all()
    total = torch.full((3,), 30.0 if scale else 1.0)
    torch.testing.assert_close(a.sum(dim=(1, 2, 3)), total)


def test_uniform_logits_leave_features_unchanged() -> None:
    """A zero conv gives equal logits: with the default scale every weight is 1."""
    module = SpatialSoftmaxAttention(16)
    with torch.no_grad():
        module.conv.weight.zero_()
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(module(x), x)
    module.scale_to_mean_one = False
    torch.testing.assert_close(module(x), x / 30)


@pytest.mark.parametrize("residual", [False, True])
def test_single_position_single_sample(residual: bool, randomize) -> None:
    """A 1x1 map has one position, whose softmax weight is 1."""
    torch.manual_seed(0)
    module = randomize(SpatialSoftmaxAttention(16, residual=residual)).eval()
    x = torch.randn(1, 16, 1, 1)
    torch.testing.assert_close(module(x), 2 * x if residual else x)


@pytest.mark.parametrize("kwargs", [{}, {"residual": True}])
@pytest.mark.parametrize("size", [(1, 1, 1), (1, 7, 5), (3, 7, 5), (3, 6, 5)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shapes(kwargs: dict, size: tuple[int, int, int], mode: str) -> None:
    torch.manual_seed(0)
    module = create_attention("spatial_softmax", 16, **kwargs).train(mode == "train")
    x = torch.randn(size[0], 16, *size[1:])
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [{}, {"residual": True}, {"scale_to_mean_one": False}])
def test_gradients_reach_every_parameter(kwargs: dict, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(create_attention("spatial_softmax", 16, **kwargs))
    x = torch.randn(3, 16, 6, 5, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    assert [name for name, _ in module.named_parameters()] == ["conv.weight"]  # no bias
    assert module.conv.weight.grad.abs().sum() > 0
    assert torch.isfinite(module.conv.weight.grad).all()
    assert x.grad.abs().sum() > 0


def test_bfloat16_autocast(randomize) -> None:
    torch.manual_seed(0)
    module = randomize(create_attention("spatial_softmax", 16))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(module.conv.weight.grad).all()
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kwargs", [{}, {"residual": True}, {"kernel_size": 5}])
def test_channels_last_matches_contiguous(kwargs: dict, randomize) -> None:
    torch.manual_seed(0)
    module = randomize(create_attention("spatial_softmax", 16, **kwargs))
    x = torch.randn(3, 16, 7, 5)
    out_last = copy.deepcopy(module)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        (16, {}, 16 * 3 * 3),  # C -> 1 conv, 3x3, no bias: 144
        (64, {}, 64 * 9),  # 576
        (64, {"kernel_size": 1}, 64),
        (64, {"kernel_size": 7}, 64 * 49),  # 3136
        (64, {"residual": True, "scale_to_mean_one": False}, 576),
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    assert n_params(create_attention("spatial_softmax", channels, **kwargs)) == expected


def test_resnet20_parameter_delta() -> None:
    base = n_params(attnzoo.create_model("resnet20"))
    model = attnzoo.create_model("resnet20", attention="spatial_softmax")
    assert n_params(model) - base == 3 * 9 * (16 + 32 + 64)  # 3,024


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 0},
        {"kernel_size": 2},
        {"kernel_size": -3},
        {"kernel_size": 3.0},
        {"kernel_size": True},
        {"residual": 1},
        {"residual": "yes"},
        {"scale_to_mean_one": None},
    ],
)
def test_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_attention("spatial_softmax", 16, **kwargs)


def test_resnet20_trains_three_steps() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="spatial_softmax").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    before = [
        m.conv.weight.detach().clone()
        for m in model.modules()
        if isinstance(m, SpatialSoftmaxAttention)
    ]
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())
    after = [m.conv.weight for m in model.modules() if isinstance(m, SpatialSoftmaxAttention)]
    assert len(after) == 9 and all(
        not torch.equal(b, a) for b, a in zip(before, after, strict=True)
    )
