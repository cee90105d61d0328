"""CSM against Yang, Zhang, Yang Eqs. 1-5 (spatial part read as DANet's position attention,
see the module docstring), with an explicit HW x HW map, and its modes and orders."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnzoo
from attnzoo.attention.csm import CSM
from attnzoo.attention.danet import PositionAttention
from attnzoo.registry import create_attention

GAMMA = 0.7


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def with_gamma(module: CSM, value: float = GAMMA) -> CSM:
    if module.spatial is not None:
        with torch.no_grad():
            module.spatial.gamma.fill_(value)
    return module


def conv1x1(conv: torch.nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of one sample's features a (C_in, HW) as a matrix product, in float64."""
    return conv.weight.detach().double().flatten(1) @ a + conv.bias.detach().double()[:, None]


def channel_reference(x: torch.Tensor, module: CSM) -> torch.Tensor:
    """F_1 = M_c(F) * F with M_c = sigmoid(W_2 ReLU(W_1 F_avg)) (Eqs. 1, 3, 4), float64."""
    x = x.double()
    se = module.channel
    out = torch.empty_like(x)
    for n in range(x.shape[0]):
        f_avg = x[n].sum(dim=(1, 2)) / (x.shape[2] * x.shape[3])  # Eq. 3
        hidden = torch.relu(conv1x1(se.fc1, f_avg[:, None]))
        m_c = torch.sigmoid(conv1x1(se.fc2, hidden))[:, 0]  # Eq. 4
        out[n] = m_c[:, None, None] * x[n]  # Eq. 1
    return out


def spatial_reference(x: torch.Tensor, module: CSM) -> torch.Tensor:
    """F_out = gamma D M_s^T + A with M_s from Eq. 5 as an explicit HW x HW map, float64."""
    x = x.double()
    pam = module.spatial
    n_batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    for n in range(n_batch):
        a = x[n].reshape(channels, height * width)
        q, k, d = conv1x1(pam.query, a), conv1x1(pam.key, a), conv1x1(pam.value, a)
        energy = q.T @ k  # (HW, HW): energy[j, i] = Q_j . K_i
        energy = energy - energy.max(dim=1, keepdim=True).values
        m_s = energy.exp() / energy.exp().sum(dim=1, keepdim=True)  # Eq. 5
        e = pam.gamma.detach().double() * (d @ m_s.T) + a
        out[n] = e.reshape(channels, height, width)
    return out


def csm_reference(x: torch.Tensor, module: CSM) -> torch.Tensor:
    if module.mode == "cam":
        return channel_reference(x, module)
    if module.mode == "sam":
        return spatial_reference(x, module)
    if module.order == "channel_first":
        return spatial_reference(channel_reference(x, module), module)
    return channel_reference(spatial_reference(x, module), module)


SIZES = [(1, 1, 1), (2, 6, 5), (1, 7, 5), (3, 4, 4)]


OPTIONS = [
    {},
    {"order": "spatial_first"},
    {"mode": "cam"},
    {"mode": "sam"},
    {"qk_reduction": 8},
    {"rd_rule": "round8", "reduction": 4},
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("channels", "kwargs"), [(32, {})] + [(16, o) for o in OPTIONS])
def test_matches_reference(
    channels: int, size: tuple[int, int, int], mode: str, kwargs: dict, randomize
) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(CSM(channels, **kwargs))).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:])
    expected = csm_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_cam_mode_is_se_channel_gating(randomize) -> None:
    torch.manual_seed(0)
    module = randomize(CSM(32, mode="cam"))
    assert module.spatial is None
    se = create_attention("se", 32)
    se.load_state_dict(module.channel.state_dict())
    x = torch.randn(3, 32, 6, 5)
    torch.testing.assert_close(module(x), se(x))
    torch.testing.assert_close(module(x), x * se.gate(x))


def test_sam_mode_is_danet_pam_with_the_same_weights(randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(CSM(32, mode="sam")))
    assert module.channel is None
    pam = create_attention("danet_pam", 32, reduction=1)
    pam.load_state_dict(module.spatial.state_dict())
    x = torch.randn(3, 32, 6, 5)
    torch.testing.assert_close(module(x), pam(x))
    assert not torch.allclose(module(x), x, atol=1e-3)


def test_spatial_part_reuses_danet_position_attention() -> None:
    assert isinstance(CSM(16).spatial, PositionAttention)


def test_spatial_part_runs_on_the_fused_kernel(randomize) -> None:
    """Default widths (B, C, D all C wide) run on torch's fused kernel, which never stores
    the HW x HW map."""
    torch.manual_seed(0)
    module = with_gamma(randomize(CSM(16)))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = module(x)
        out.sum().backward()
    torch.testing.assert_close(
        out.double(), csm_reference(x.detach(), module), atol=1e-5, rtol=1e-5
    )


def test_orders_differ_with_the_same_weights(randomize) -> None:
    torch.manual_seed(0)
    channel_first = with_gamma(randomize(CSM(16)))
    spatial_first = CSM(16, order="spatial_first")
    spatial_first.load_state_dict(channel_first.state_dict())
    x = torch.randn(2, 16, 6, 5)
    assert not torch.allclose(channel_first(x), spatial_first(x), atol=1e-3)


def test_default_widths_follow_the_paper() -> None:
    """Fig. 3: B, C, D all have C channels; r = 16 with the floor rule."""
    module = CSM(64)
    assert module.spatial.query.out_channels == module.spatial.key.out_channels == 64
    assert module.spatial.value.out_channels == 64
    assert module.channel.fc1.out_channels == 4
    assert module.mode == "csm" and module.order == "channel_first"


def test_starts_as_channel_attention() -> None:
    """gamma = 0 at init, so CSM equals its channel branch until gamma moves."""
    torch.manual_seed(0)
    module = CSM(16)
    assert module.spatial.gamma.item() == 0.0
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(module(x), module.channel(x))


@pytest.mark.parametrize(
    "kwargs", [{}, {"mode": "cam"}, {"mode": "sam"}, {"order": "spatial_first"}]
)
@pytest.mark.parametrize("size", [(1, 1, 1), (1, 7, 5), (3, 7, 5), (3, 6, 5)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shapes(kwargs: dict, size: tuple[int, int, int], mode: str) -> None:
    torch.manual_seed(0)
    module = with_gamma(CSM(16, **kwargs)).train(mode == "train")
    x = torch.randn(size[0], 16, *size[1:])
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs", [{}, {"mode": "sam"}, {"order": "spatial_first"}])
def test_gradients_reach_every_parameter(kwargs: dict, randomize, assert_gradients) -> None:
    torch.manual_seed(0)
    # r = 4 and positive fc1 biases keep the ReLU units on: a unit that is off for every
    # sample would pass no gradient to fc1, which is not what this test is about.
    module = with_gamma(randomize(CSM(16, reduction=4, **kwargs)))
    if module.channel is not None:
        with torch.no_grad():
            module.channel.fc1.bias.abs_()
    module = module.double()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    assert_gradients(module, "csm")  # all but the position attention's key bias
    assert x.grad.abs().sum() > 0


def test_gamma_gets_gradient_at_zero_init() -> None:
    torch.manual_seed(0)
    module = CSM(16)
    out = module(torch.randn(2, 16, 6, 5))
    (out * torch.randn_like(out)).sum().backward()
    assert module.spatial.gamma.grad.abs() > 0


@pytest.mark.parametrize("kwargs", [{}, {"order": "spatial_first"}])
def test_bfloat16_autocast(kwargs: dict, randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(CSM(16, **kwargs)))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kwargs", [{}, {"order": "spatial_first"}, {"qk_reduction": 8}])
def test_channels_last_matches_contiguous(kwargs: dict, randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(CSM(16, **kwargs)))
    x = torch.randn(3, 16, 7, 5)
    out_last = copy.deepcopy(module)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), module(x), atol=1e-5, rtol=1e-5)


def se_params(c: int, hidden: int) -> int:
    return c * hidden + hidden + hidden * c + c


def pam_params(c: int, qk: int) -> int:
    return 2 * (c * qk + qk) + c * c + c + 1


@pytest.mark.parametrize(
    ("channels", "kwargs", "expected"),
    [
        # SE part (C*h + h + h*C + C) plus 3 C x C 1x1 convs with bias plus gamma
        (16, {}, (16 * 1 + 1 + 1 * 16 + 16) + 3 * (16 * 16 + 16) + 1),  # 49 + 817 = 866
        (32, {}, (32 * 2 + 2 + 2 * 32 + 32) + 3 * (32 * 32 + 32) + 1),  # 162 + 3169 = 3331
        (64, {}, (64 * 4 + 4 + 4 * 64 + 64) + 3 * (64 * 64 + 64) + 1),  # 580 + 12481 = 13061
        (64, {"mode": "cam"}, 580),
        (64, {"mode": "sam"}, 12481),
        (64, {"order": "spatial_first"}, 13061),
        (64, {"qk_reduction": 8}, 580 + 2 * (64 * 8 + 8) + 64 * 64 + 64 + 1),  # 580 + 5201
    ],
)
def test_parameter_count(channels: int, kwargs: dict, expected: int) -> None:
    module = create_attention("csm", channels, **kwargs)
    assert n_params(module) == expected
    hidden = module.channel.fc1.out_channels if module.channel is not None else 0
    qk = module.spatial.query.out_channels if module.spatial is not None else 0
    assert expected == (se_params(channels, hidden) if hidden else 0) + (
        pam_params(channels, qk) if qk else 0
    )


def test_resnet20_parameter_delta() -> None:
    base = n_params(attnzoo.create_model("resnet20"))
    with_csm = n_params(attnzoo.create_model("resnet20", attention="csm"))
    assert with_csm - base == 3 * (866 + 3331 + 13061)  # 51,774


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "both"},
        {"mode": "CSM"},
        {"mode": None},
        {"order": "channel-first"},
        {"order": "random"},
        {"reduction": 0},
        {"qk_reduction": 0},
        {"qk_reduction": -1},
        {"rd_rule": "ceil"},
    ],
)
def test_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_attention("csm", 16, **kwargs)


def test_resnet20_trains_three_steps() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="csm").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    gammas = [p for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 9 and all(p.item() != 0.0 for p in gammas)
