"""ELA (attnzoo/attention/ela.py) against a float64 reference written from its equations: the
grouped 1-D convolution as explicit sums over taps, GroupNorm by hand, per direction."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.attention.ela import EfficientLocalAttention


def conv1d(z: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped cross-correlation with zero padding k // 2, z (N, C, L), weight (C, C/g, k)."""
    n, c, length = z.shape
    k = weight.shape[2]
    per_group = c // groups
    pad = torch.zeros(n, c, k // 2, dtype=z.dtype)
    padded = torch.cat([pad, z, pad], dim=2)
    out = torch.zeros(n, c, length, dtype=z.dtype)
    for o in range(c):
        first = (o // per_group) * per_group  # the input channels of o's group
        for j in range(per_group):
            for t in range(k):
                out[:, o] += weight[o, j, t] * padded[:, first + j, t : t + length]
    return out


def group_norm(z: torch.Tensor, groups: int, scale, shift, eps: float) -> torch.Tensor:
    n, c, length = z.shape
    out = torch.empty_like(z)
    per_group = c // groups
    for i in range(n):
        for g in range(groups):
            block = z[i, g * per_group : (g + 1) * per_group]
            mean = block.sum() / block.numel()
            var = ((block - mean) ** 2).sum() / block.numel()
            out[i, g * per_group : (g + 1) * per_group] = (block - mean) / torch.sqrt(var + eps)
    return out * scale[None, :, None] + shift[None, :, None]


def reference(x: torch.Tensor, m: EfficientLocalAttention) -> torch.Tensor:
    n, c, h, w = x.shape
    z_h = torch.stack([x[:, :, i, :].sum(-1) / w for i in range(h)], dim=-1)  # (N, C, H)
    z_w = torch.stack([x[:, :, :, j].sum(-1) / h for j in range(w)], dim=-1)  # (N, C, W)
    weight = m.conv.weight.detach().double()
    scale, shift = m.gn.weight.detach().double(), m.gn.bias.detach().double()

    def gate(z):
        normed = group_norm(conv1d(z, weight, m.conv_groups), m.norm_groups, scale, shift, 1e-5)
        return 1 / (1 + torch.exp(-normed))

    return x * gate(z_h)[:, :, :, None] * gate(z_w)[:, :, None, :]


CASES = [
    ((2, 32, 7, 5), {}),
    ((1, 16, 1, 1), {}),
    ((3, 64, 6, 9), {"variant": "T"}),
    ((2, 32, 7, 5), {"variant": "S"}),
    ((2, 64, 5, 8), {"variant": "L"}),
    ((2, 16, 7, 5), {"variant": "T"}),  # 32 GN groups capped to 16
    ((2, 24, 4, 6), {"kernel_size": 3, "norm_groups": 5, "channels_per_conv_group": 3}),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("shape", "options"), CASES)
def test_matches_the_equations(mode, shape, options, randomize):
    torch.manual_seed(0)
    m = randomize(EfficientLocalAttention(shape[1], **options)).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    out = m(x)
    assert (out / x).std() > 0.05  # random weights: the gates differ
    torch.testing.assert_close(out, reference(x, m), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("variant", "kernel", "conv_groups", "norm_groups", "params"),
    [
        ("T", 5, 64, 32, 64 * 5 + 2 * 64),
        ("B", 7, 64, 16, 64 * 7 + 2 * 64),
        ("S", 5, 8, 16, 64 * 8 * 5 + 2 * 64),  # 8 input channels per conv group
        ("L", 7, 8, 16, 64 * 8 * 7 + 2 * 64),
    ],
)
def test_variants(variant, kernel, conv_groups, norm_groups, params):
    m = EfficientLocalAttention(64, variant=variant)
    assert m.conv.kernel_size == (kernel,) and m.conv.padding == (kernel // 2,)
    assert (m.conv_groups, m.conv.groups, m.norm_groups, m.gn.num_groups) == (
        conv_groups, conv_groups, norm_groups, norm_groups
    )  # fmt: skip
    assert m.conv.bias is None
    assert sum(p.numel() for p in m.parameters()) == params


@pytest.mark.parametrize(
    ("channels", "options", "conv_groups", "norm_groups"),
    [(16, {"variant": "T"}, 16, 16), (300, {}, 300, 15), (12, {"variant": "S"}, 1, 12),
     (20, {"variant": "L"}, 2, 10), (342, {"variant": "S"}, 38, 9)],
)  # fmt: skip
def test_groups_are_capped_to_divisors(channels, options, conv_groups, norm_groups):
    m = EfficientLocalAttention(channels, **options)
    assert (m.conv_groups, m.norm_groups) == (conv_groups, norm_groups)


def test_group_norm_is_nn_group_norm(randomize):
    """The written-out GroupNorm equals ``nn.GroupNorm`` wherever the latter accepts the input;
    where each group holds one value (batch 1, C = 16, 1 x 1 map) it returns the shift."""
    torch.manual_seed(0)
    m = randomize(EfficientLocalAttention(32)).double()
    z = torch.randn(3, 32, 6, dtype=torch.float64)
    torch.testing.assert_close(m.group_norm(z), m.gn(z), rtol=1e-12, atol=1e-12)
    m = randomize(EfficientLocalAttention(16)).double()
    single = torch.randn(1, 16, 1, dtype=torch.float64)
    torch.testing.assert_close(m.group_norm(single), m.gn.bias.detach()[None, :, None])


def test_one_conv_serves_both_directions():
    m = EfficientLocalAttention(16).eval()
    x = torch.randn(2, 16, 5, 5)
    y_h, y_w = m.gates(x.transpose(2, 3))  # a transposed map swaps the two gates
    g_h, g_w = m.gates(x)
    torch.testing.assert_close(y_h.transpose(2, 3), g_w)
    torch.testing.assert_close(y_w.transpose(2, 3), g_h)
    assert [name for name, _ in m.named_parameters()] == ["conv.weight", "gn.weight", "gn.bias"]


def test_resnet50_count():
    from attnzoo.measure import count_params

    with torch.device("meta"):
        model = attnzoo.create_model("resnet50", attention="ela")
    # ELA-B per block: 7 C (depthwise conv) + 2 C (GN) = 9 C; 9 * 15,104 = 135,936
    assert count_params(model) == 25_557_032 + 135_936


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("ela")
    assert losses[-1] < losses[0]
    losses = losses_in_resnet20("ela", variant="S")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"variant": "M"}, "variant"), ({"variant": "b"}, "variant"), ({"kernel_size": 4}, "odd"),
     ({"kernel_size": 0}, "kernel_size"), ({"kernel_size": 3.0}, "kernel_size"),
     ({"norm_groups": 0}, "norm_groups"), ({"norm_groups": True}, "norm_groups"),
     ({"channels_per_conv_group": 0}, "channels_per_conv_group")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EfficientLocalAttention(16, **kwargs)
