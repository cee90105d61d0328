"""FcaNet's multi-spectral channel attention (attnzoo/attention/fca.py) against a float64
reference: the DCT basis from its formula, element by element, the frequency tables as the
official code lists them, adaptive average pooling from its bin definition."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.attention.fca import FrequencyChannelAttention

# The official code's rankings (cfzd/FcaNet, model/layer.py), as its two index lists.
TABLES = {
    "top": (
        [0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1],
        [0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3],
    ),
    "low": (
        [0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4],
        [0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3],
    ),
    "bot": (
        [6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6],
        [6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3],
    ),
}  # fmt: skip


def channel_frequencies(channels: int, selection: str, size: int) -> list[tuple[int, int]]:
    """(u, v) of every channel: n parts as even as possible, the first C mod n one larger."""
    kind, count = selection[:3], int(selection[3:])
    xs, ys = TABLES[kind]
    scale = size // 7
    out = []
    for part in range(count):
        start = part * (channels // count) + min(part, channels % count)
        stop = (part + 1) * (channels // count) + min(part + 1, channels % count)
        out += [(xs[part] * scale, ys[part] * scale)] * (stop - start)
    assert len(out) == channels
    return out


def dct(k: int, t: int, size: int) -> float:
    scale = math.sqrt(1 / size) if k == 0 else math.sqrt(2 / size)
    return scale * math.cos(math.pi * k * (t + 0.5) / size)


def adaptive_average(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bin i of n cells covers [floor(i n / S), ceil((i + 1) n / S))."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, size, size, dtype=x.dtype)
    for i in range(size):
        r0, r1 = (i * h) // size, -(-(i + 1) * h // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -(-(j + 1) * w // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
    return out


def reference(x: torch.Tensor, m: FrequencyChannelAttention, selection: str, size: int):
    n, c, h, w = x.shape
    pooled = x if (h, w) == (size, size) else adaptive_average(x, size)
    freq = torch.zeros(n, c, dtype=torch.float64)
    for ch, (u, v) in enumerate(channel_frequencies(c, selection, size)):
        basis = torch.tensor(
            [[dct(u, hh, size) * dct(v, ww, size) for ww in range(size)] for hh in range(size)],
            dtype=torch.float64,
        )
        freq[:, ch] = (pooled[:, ch] * basis).sum(dim=(1, 2))
    w1, w2 = m.fc1.weight.detach().double(), m.fc2.weight.detach().double()
    att = torch.sigmoid(torch.relu(freq @ w1.T) @ w2.T)
    return x * att[:, :, None, None], freq


CASES = [
    # (shape, options): no pooling; pooling down and replicating up; C not a multiple of 16;
    # C < 16; 1 x 1 maps; other selections; a 14 x 14 grid (indices doubled)
    ((2, 16, 7, 7), {}),
    ((2, 32, 7, 5), {}),
    ((3, 24, 9, 11), {}),
    ((2, 8, 7, 7), {}),
    ((1, 16, 1, 1), {}),
    ((2, 32, 8, 8), {"frequencies": "low16"}),
    ((2, 48, 7, 7), {"frequencies": "bot16"}),
    ((2, 64, 7, 7), {"frequencies": "top32"}),
    ((2, 20, 7, 7), {"frequencies": "top1"}),
    ((2, 32, 14, 14), {"frequencies": "low8", "dct_size": 14}),
    ((2, 16, 10, 6), {"frequencies": "top4", "dct_size": 14}),
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(("shape", "options"), CASES)
def test_matches_the_equations(mode, shape, options, randomize):
    torch.manual_seed(0)
    m = randomize(FrequencyChannelAttention(shape[1], **options)).double().train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    selection, size = options.get("frequencies", "top16"), options.get("dct_size", 7)
    expected, freq = reference(x, m, selection, size)
    torch.testing.assert_close(m.descriptor(x), freq, rtol=1e-10, atol=1e-10)
    out = m(x)
    assert (out / x).std() > 0.01 or shape[2:] == (1, 1)  # gates are not all alike
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_the_zero_frequency_is_scaled_average_pooling():
    """(u, v) = (0, 0) on an S x S map: S times the channel mean (the paper's Theorem 1, up to
    the orthonormal constants)."""
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    m = FrequencyChannelAttention(4, frequencies="top1").double()
    torch.testing.assert_close(m.descriptor(x), 7 * x.mean(dim=(2, 3)))


def test_frequencies_per_channel():
    m = FrequencyChannelAttention(32)  # two channels per frequency
    assert m.frequency_u[:6].tolist() == [0, 0, 0, 0, 6, 6]
    assert m.frequency_v[:6].tolist() == [0, 0, 1, 1, 0, 0]
    m = FrequencyChannelAttention(32, dct_size=28)  # (6, 0) on 7 x 7 is (24, 0) on 28 x 28
    assert m.frequency_u[4].item() == 24
    m = FrequencyChannelAttention(18)  # 18 = 16 + 2: the first two parts get two channels
    assert m.frequency_v.tolist()[:6] == [0, 0, 1, 1, 0, 5]


def test_the_basis_is_not_a_parameter_and_not_saved():
    m = FrequencyChannelAttention(64)
    assert [name for name, _ in m.named_parameters()] == ["fc1.weight", "fc2.weight"]
    assert set(m.state_dict()) == {"fc1.weight", "fc2.weight"}
    m = m.to(torch.bfloat16)  # the indices stay integers; the basis is built in float32
    assert m.frequency_u.dtype == torch.int64
    assert m.descriptor(torch.randn(1, 64, 7, 7).bfloat16()).dtype == torch.float32


def test_parameters_and_resnet50_count():
    # no biases; hidden max(8, C // 16)
    assert sum(p.numel() for p in FrequencyChannelAttention(256).parameters()) == 2 * 256 * 16
    assert sum(p.numel() for p in FrequencyChannelAttention(64).parameters()) == 2 * 64 * 8
    official = FrequencyChannelAttention(64, min_hidden=1)
    assert sum(p.numel() for p in official.parameters()) == 2 * 64 * 4
    from attnzoo.measure import count_params

    with torch.device("meta"):
        fca = count_params(attnzoo.create_model("resnet50", attention="fca"))
        se = count_params(attnzoo.create_model("resnet50", attention="se"))
    # SE-ResNet-50 minus SE's biases, sum of C + C/16 over the 16 blocks = 16,048: 28.07M
    biases = 3 * (256 + 16) + 4 * (512 + 32) + 6 * (1024 + 64) + 3 * (2048 + 128)
    assert fca == se - biases == 28_071_976


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("fca")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"frequencies": "top0"}, "frequencies"), ({"frequencies": "top33"}, "frequencies"),
     ({"frequencies": "mid4"}, "frequencies"), ({"frequencies": 16}, "frequencies"),
     ({"frequencies": "top16 "}, "frequencies"), ({"dct_size": 8}, "dct_size"),
     ({"dct_size": 0}, "dct_size"), ({"dct_size": True}, "dct_size"),
     ({"reduction": 0}, "reduction"), ({"min_hidden": 0}, "min_hidden")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrequencyChannelAttention(16, **kwargs)
