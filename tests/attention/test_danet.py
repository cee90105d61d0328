"""DANet position and channel attention against Fu et al. Eqs. 1-4, with explicit N x N and
C x C maps, and their options."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnzoo
from attnzoo.attention.danet import ChannelAttention, PositionAttention
from attnzoo.registry import create_attention

GAMMA = 0.7


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv1x1(conv: torch.nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of one sample's features a (C_in, N) as a matrix product, in float64."""
    weight = conv.weight.detach().double().flatten(1)
    return weight @ a + conv.bias.detach().double()[:, None]


def pam_reference(x: torch.Tensor, module: PositionAttention) -> torch.Tensor:
    """Eqs. 1-2 one sample at a time, the N x N map written out, in float64.

    Query (the output position j) from the conv called ``query``, keys i from ``key``:
    s_ji = exp(Q_j . K_i) / sum_i exp(Q_j . K_i),  E_j = gamma sum_i s_ji D_i + A_j.
    """
    x = x.double()
    n_batch, channels, height, width = x.shape
    gamma = module.gamma.detach().double()
    out = torch.empty_like(x)
    for n in range(n_batch):
        a = x[n].reshape(channels, height * width)  # A, (C, N)
        q, k, d = conv1x1(module.query, a), conv1x1(module.key, a), conv1x1(module.value, a)
        energy = q.T @ k  # (N, N): energy[j, i] = Q_j . K_i
        energy = energy - energy.max(dim=1, keepdim=True).values  # exp stays finite
        s = energy.exp() / energy.exp().sum(dim=1, keepdim=True)  # Eq. 1, rows sum to 1
        e = gamma * (d @ s.T) + a  # Eq. 2: E_j = gamma sum_i s_ji D_i + A_j
        out[n] = e.reshape(channels, height, width)
    return out


def cam_reference(x: torch.Tensor, module: ChannelAttention) -> torch.Tensor:
    """Eqs. 3-4 one sample and one output channel at a time, in float64, no max shift."""
    x = x.double()
    n_batch, channels, height, width = x.shape
    beta = module.beta.detach().double()
    out = torch.empty_like(x)
    for n in range(n_batch):
        a = x[n].reshape(channels, height * width)
        for j in range(channels):
            # Eq. 3: x_ji = exp(A_i . A_j) / sum_i exp(A_i . A_j)
            numerators = torch.stack([torch.exp(a[i] @ a[j]) for i in range(channels)])
            weights = numerators / numerators.sum()
            # Eq. 4: E_j = beta sum_i x_ji A_i + A_j
            mixed = sum(weights[i] * a[i] for i in range(channels))
            out[n, j] = (beta * mixed + a[j]).reshape(height, width)
    return out


def with_gamma(module: torch.nn.Module, value: float = GAMMA) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("gamma", "beta")):
                param.fill_(value)
    return module


SIZES = [(1, 1, 1), (2, 6, 5), (1, 7, 5), (3, 4, 4)]


@pytest.mark.parametrize("channels", [16, 32])
@pytest.mark.parametrize("reduction", [8, 1, 0.5])  # Q, K narrower, equal, wider than D
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pam_matches_reference(
    channels: int, reduction: int, size: tuple[int, int, int], mode: str, randomize
) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(PositionAttention(channels, reduction))).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:])
    expected = pam_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [8, 16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cam_matches_reference(channels: int, size: tuple[int, int, int], mode: str) -> None:
    torch.manual_seed(0)
    module = with_gamma(ChannelAttention(channels)).train(mode == "train")
    x = torch.randn(size[0], channels, *size[1:]) * 0.5 + 0.2
    expected = cam_reference(x, module)
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_cam_is_not_the_official_code_energy() -> None:
    """The code's softmax(max - A A^T) = softmax(-A A^T) favours dissimilar channels."""
    torch.manual_seed(0)
    module = with_gamma(ChannelAttention(16))
    x = torch.randn(2, 16, 6, 5)
    a = x.flatten(2)
    energy = a @ a.transpose(1, 2)
    code_energy = energy.amax(dim=-1, keepdim=True) - energy
    code_out = GAMMA * (torch.softmax(code_energy, dim=-1) @ a).view_as(x) + x
    paper_out = GAMMA * (torch.softmax(energy, dim=-1) @ a).view_as(x) + x
    torch.testing.assert_close(module(x), paper_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(module(x), code_out, atol=1e-2)


def test_cam_is_finite_for_large_energies() -> None:
    """Energies of order 1e6 would overflow a naive exp; the stable softmax stays exact."""
    torch.manual_seed(0)
    module = with_gamma(ChannelAttention(16))
    x = torch.randn(2, 16, 8, 8) * 100
    out = module(x)
    assert torch.isfinite(out).all()
    a = x.double().flatten(2)
    expected = GAMMA * (torch.softmax(a @ a.transpose(1, 2), dim=-1) @ a).view_as(x) + x
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("reduction", [8, 1, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pam_runs_on_the_fused_kernel(reduction: float, channels_last: bool, randomize) -> None:
    """torch's fused kernel never stores the N x N map; with only it allowed, the module
    must still run, forward and backward (the fallback would build the map)."""
    torch.manual_seed(0)
    module = with_gamma(randomize(PositionAttention(16, reduction)))
    x = torch.randn(2, 16, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = module(x.requires_grad_())
        out.sum().backward()
    torch.testing.assert_close(
        out.double(), pam_reference(x.detach(), module), atol=1e-5, rtol=1e-5
    )


def test_pam_is_finite_for_large_energies(randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(PositionAttention(16)))
    x = torch.randn(2, 16, 6, 5) * 50
    out = module(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), pam_reference(x, module), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_starts_as_identity(name: str) -> None:
    torch.manual_seed(0)
    module = create_attention(name, 16)
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(module(x), x)


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
@pytest.mark.parametrize("size", [(1, 1, 1), (1, 7, 5), (3, 7, 5), (3, 6, 5), (2, 1, 6)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_shapes(name: str, size: tuple[int, int, int], mode: str) -> None:
    torch.manual_seed(0)
    module = with_gamma(create_attention(name, 16)).train(mode == "train")
    x = torch.randn(size[0], 16, *size[1:])
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_single_position_pam_adds_gamma_times_value(randomize) -> None:
    """One position: the softmax weight is 1, so E = gamma D + A."""
    torch.manual_seed(0)
    module = with_gamma(randomize(PositionAttention(16))).eval()
    x = torch.randn(1, 16, 1, 1)
    expected = GAMMA * module.value(x) + x
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_gradients_reach_every_parameter(name: str, randomize, assert_gradients) -> None:
    """Every parameter learns except PAM's key bias, which the softmax cancels exactly
    (tests/attention/conftest.py, ZERO_GRADIENT_BY_CONSTRUCTION)."""
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention(name, 16))).double()
    x = torch.randn(3, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    assert_gradients(module, name)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_pam_key_bias_cancels_in_the_softmax() -> None:
    """Why key.bias gets no gradient: changing it leaves the output unchanged (float64)."""
    torch.manual_seed(0)
    module = with_gamma(PositionAttention(16)).double().eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    before = module(x)
    with torch.no_grad():
        module.key.bias.add_(torch.randn_like(module.key.bias) * 3)
    torch.testing.assert_close(module(x), before, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        module.query.bias.add_(torch.randn_like(module.query.bias) * 3)
    assert (module(x) - before).abs().max() > 1e-3  # the query bias does matter


@pytest.mark.parametrize(("name", "scale"), [("danet_pam", "gamma"), ("danet_cam", "beta")])
def test_scale_gets_gradient_at_zero_init(name: str, scale: str) -> None:
    """At init the scale is 0 and blocks the path, but the scale itself must learn."""
    torch.manual_seed(0)
    module = create_attention(name, 16)
    param = getattr(module, scale)
    assert param.item() == 0.0 and param.dim() == 0
    out = module(torch.randn(2, 16, 6, 5))
    (out * torch.randn_like(out)).sum().backward()
    assert param.grad.abs() > 0


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_bfloat16_autocast(name: str, randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention(name, 16)))
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    for param_name, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
    # CAM too: its energies A A^T (large, a sum over HW products) are computed in float32.
    torch.testing.assert_close(out.float(), module(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_channels_last_matches_contiguous(name: str, randomize) -> None:
    torch.manual_seed(0)
    module = with_gamma(randomize(create_attention(name, 16)))
    x = torch.randn(3, 16, 7, 5)
    out_last = copy.deepcopy(module)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_last.contiguous(), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "reduction", "expected"),
    [
        # 2 * (C*C' + C') for B and C, C*C + C for D, 1 for gamma
        (16, 8, 2 * (16 * 2 + 2) + 16 * 16 + 16 + 1),  # 341
        (32, 8, 2 * (32 * 4 + 4) + 32 * 32 + 32 + 1),  # 1321
        (64, 8, 2 * (64 * 8 + 8) + 64 * 64 + 64 + 1),  # 5201
        (64, 1, 2 * (64 * 64 + 64) + 64 * 64 + 64 + 1),  # 12481
        (4, 8, 2 * (4 * 1 + 1) + 4 * 4 + 4 + 1),  # C // 8 = 0, kept at 1: 31
    ],
)
def test_pam_parameter_count(channels: int, reduction: int, expected: int) -> None:
    module = create_attention("danet_pam", channels, reduction=reduction)
    assert module.query.out_channels == module.key.out_channels == max(1, channels // reduction)
    assert n_params(module) == expected


@pytest.mark.parametrize("channels", [16, 64, 512])
def test_cam_parameter_count(channels: int) -> None:
    assert n_params(create_attention("danet_cam", channels)) == 1  # beta only


def test_literal_parameter_counts() -> None:
    assert n_params(create_attention("danet_pam", 64)) == 5201
    assert n_params(create_attention("danet_pam", 16)) == 341


@pytest.mark.parametrize("kwargs", [{"reduction": 0}, {"reduction": -8}, {"gamma": 1.0}])
def test_pam_bad_options_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        create_attention("danet_pam", 16, **kwargs)


def test_cam_takes_no_options() -> None:
    with pytest.raises(ValueError, match="valid options"):
        create_attention("danet_cam", 16, reduction=8)


@pytest.mark.parametrize("name", ["danet_pam", "danet_cam"])
def test_resnet20_trains_three_steps(name: str) -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention=name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    scales = [p for n, p in model.named_parameters() if n.endswith(("gamma", "beta"))]
    assert len(scales) == 9 and all(p.item() != 0.0 for p in scales)


@pytest.mark.parametrize("name", ["danet_pam", "csm"])
def test_recompute_gives_the_same_outputs_and_gradients(name):
    """recompute=True (default) trades memory for a second forward of the attention path."""
    torch.manual_seed(0)
    module = create_attention(name, 16).train()
    pam = module if name == "danet_pam" else module.spatial
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    proj = torch.randn(2, 16, 6, 5)
    results = []
    for recompute in (True, False):
        pam.recompute = recompute
        module.zero_grad()
        x.grad = None
        out = module(x)
        (out * proj).sum().backward()
        results.append(
            [out.detach(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        )
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_cam_code_energy_is_softmax_of_the_negated_energy() -> None:
    """energy="code": the official code's softmax(max(AA^T) - AA^T), i.e. softmax(-AA^T),
    against a float64 reference; it weights the least similar channels most."""
    torch.manual_seed(0)
    module = create_attention("danet_cam", 6, energy="code").double()
    with torch.no_grad():
        module.beta.fill_(0.7)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    a = x.flatten(2)
    energy = a @ a.transpose(1, 2)
    expected = x + 0.7 * (torch.softmax(-energy, dim=-1) @ a).view(x.shape)
    torch.testing.assert_close(module(x), expected)
    paper = create_attention("danet_cam", 6).double()
    paper.load_state_dict(module.state_dict())
    assert (paper(x) - module(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="energy must be one of"):
        create_attention("danet_cam", 6, energy="both")
