"""FcaNet: multi-spectral channel attention (Qin, Zhang, Wu, Li, "FcaNet: Frequency Channel
Attention Networks", ICCV 2021, arXiv:2012.11879; official code cfzd/FcaNet,
``model/layer.py``).

SE's squeeze is global average pooling, which the paper shows is (up to a constant) the
lowest-frequency coefficient of the 2-D DCT. FcaNet squeezes with several DCT frequencies:
the C channels are split into n parts, part i is projected on the 2-D DCT-II basis function
of its own frequency (u_i, v_i), and the n results form the descriptor that SE's excitation
turns into channel weights. For one sample, on an S x S grid (h, w = 0 .. S-1):

    b_S(k, t)           = sqrt((1 if k = 0 else 2) / S) cos(pi k (t + 1/2) / S)
    B^{u,v}(h, w)       = b_S(u, h) b_S(v, w)                    the 2-D DCT basis
    Freq_c              = sum_{h,w} x_c(h, w) B^{u_i, v_i}(h, w)  c in part i
    att                 = sigmoid(W2 relu(W1 Freq))              W1: C -> C/r, W2: C/r -> C
    y_c                 = att_c x_c

The paper writes the basis without its normalising constants (cos(pi h/H (i + 1/2)) ...);
we use the orthonormal DCT-II constants of the official code, with which
Freq_c = S x mean(x_c) at (u, v) = (0, 0).

Choices, with the official code:
- ``frequencies``: ``"top16"`` (default), the paper's two-step selection (FcaNet-TS: the 16
  frequencies of the 7 x 7 grid whose single-frequency networks scored best); ``"low16"``
  the lowest frequencies (FcaNet-LF); ``"bot16"`` the worst-scoring ones. The tables are
  the official code's rankings of the 7 x 7 grid (32 entries each); ``"topK"``, ``"lowK"``,
  ``"botK"`` take their first K (the code allows K = 1, 2, 4, 8, 16, 32; any K from 1 to 32
  is accepted here).
- ``dct_size`` S = 7 (default): the DCT runs on a fixed S x S grid and a map of any other
  size is first average-pooled to S x S (``F.adaptive_avg_pool2d``), as the official layer
  does for inputs of another size. S must be a multiple of 7: the 7 x 7 frequency indices
  are scaled by S // 7 (as in the code: (2, 2) on 14 x 14 is (1, 1) on 7 x 7).
  Difference from the official ImageNet models: they set S per stage to the stage's map
  size (56, 28, 14, 7 at 224 px) and never pool; here one S serves every block, so a
  224-px ResNet-50 pools its 56, 28 and 14 maps to 7 x 7 first. Maps smaller than S (CIFAR
  8 x 8 maps are pooled down, 5 x 5 or 1 x 1 maps are *replicated* up by the adaptive pool)
  get the same treatment as in the official layer.
- Channel split: part i holds channels [i C/n, (i+1) C/n) when n divides C (official).
  The code requires that; we split as evenly as possible otherwise (the first C mod n parts
  get one channel more, as ``torch.tensor_split``), and with C < n only the first C
  frequencies are used (one channel each).
- Excitation: both FC layers without bias, as in the official code (so FcaNet has exactly
  SE's parameters minus SE's biases). Hidden width max(C // r, ``min_hidden``), r = 16
  (``reduction``), ``min_hidden`` = 8. The official width is C // r; the floor of 8 changes
  nothing at C >= 128 (every ResNet-50 block) but gives narrow maps (CIFAR's C = 16, 32, 64)
  8 hidden units instead of 1, 2, 4: with no biases, a layer of one or two ReLU units is
  easily dead for a whole batch, and then neither FC layer gets any gradient.
  ``min_hidden=1`` gives the official width everywhere.
- The DCT basis is not a parameter (the official "fixed DCT" variant, its best). It is
  computed at run time, on the input's device, from the per-channel frequency indices (a
  non-persistent buffer): in at least float32 (float64 for a float64 input), so casting the
  module to bf16 or half does not round the basis. The pooled map is cast to that precision
  before the projection; the FC layers run in the module's (or autocast's) dtype.
- Placement: in every residual block, where SE goes (official FcaNet ResNets: after the last
  BN of the residual branch, before the addition).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_attention
from .layers import check_input, exporting, reduced_channels


def adaptive_pool_matrix(
    length: int, size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(size, length) matrix M with ``M @ v`` = ``adaptive_avg_pool1d(v, size)``: row i
    averages positions floor(i L / S) .. ceil((i + 1) L / S) - 1. Built from tensor ops, so
    a traced graph keeps ``length`` dynamic (adaptive pooling itself would pin it)."""
    i = torch.arange(size, device=device)
    start = (i * length) // size
    end = ((i + 1) * length + size - 1) // size
    pos = torch.arange(length, device=device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


# (u, v) = (vertical, horizontal) frequency on the 7 x 7 grid, best first, from the official
# code's rankings (``get_freq_indices``).
FREQUENCY_TABLES: dict[str, tuple[tuple[int, int], ...]] = {
    "top": (
        (0, 0), (0, 1), (6, 0), (0, 5), (0, 2), (1, 0), (1, 2), (4, 0),
        (5, 0), (1, 6), (3, 0), (0, 4), (0, 6), (0, 3), (3, 5), (2, 2),
        (4, 6), (6, 3), (3, 3), (5, 3), (5, 5), (2, 1), (6, 1), (5, 2),
        (5, 4), (3, 2), (3, 1), (4, 1), (2, 3), (2, 0), (6, 5), (1, 3),
    ),
    "low": (
        (0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (2, 1), (1, 2),
        (2, 2), (0, 3), (3, 0), (4, 0), (0, 4), (1, 3), (3, 1), (0, 5),
        (1, 4), (2, 3), (3, 2), (4, 1), (5, 0), (0, 6), (1, 5), (2, 4),
        (3, 3), (4, 2), (5, 1), (6, 0), (1, 6), (2, 5), (3, 4), (4, 3),
    ),
    "bot": (
        (6, 6), (1, 4), (3, 4), (3, 6), (2, 6), (4, 3), (1, 1), (2, 4),
        (4, 4), (4, 5), (5, 6), (1, 5), (4, 2), (6, 2), (2, 5), (5, 1),
        (6, 4), (1, 3), (6, 5), (2, 0), (2, 3), (4, 1), (3, 1), (3, 2),
        (5, 4), (5, 2), (6, 1), (2, 1), (5, 5), (5, 3), (3, 3), (6, 3),
    ),
}  # fmt: skip
BASE_GRID = 7  # the grid the tables index


def selected_frequencies(frequencies: str) -> tuple[tuple[int, int], ...]:
    """The (u, v) list of a selection name such as ``"top16"`` (on the 7 x 7 grid)."""
    match = (
        re.fullmatch(r"(top|low|bot)(\d+)", frequencies) if isinstance(frequencies, str) else None
    )
    count = int(match.group(2)) if match else 0
    if not match or not 1 <= count <= len(FREQUENCY_TABLES[match.group(1)]):
        raise ValueError(
            f"frequencies must be 'top', 'low' or 'bot' followed by a count from 1 to 32 "
            f"(for example 'top16'), got {frequencies!r}"
        )
    return FREQUENCY_TABLES[match.group(1)][:count]


def part_sizes(channels: int, parts: int) -> list[int]:
    """Channels per part, as even as possible, larger parts first (``torch.tensor_split``)."""
    quotient, remainder = divmod(channels, parts)
    return [quotient + 1] * remainder + [quotient] * (parts - remainder)


def dct_basis(frequency: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """b_S(k, t) for every k in ``frequency`` (any shape) and t = 0 .. S-1: shape (*, S)."""
    positions = torch.arange(size, device=frequency.device, dtype=dtype) + 0.5
    k = frequency.to(dtype).unsqueeze(-1)
    scale = torch.full_like(k, math.sqrt(2 / size)).masked_fill(k == 0, math.sqrt(1 / size))
    return scale * torch.cos(math.pi * k * positions / size)


@register_attention("fca")
class FrequencyChannelAttention(nn.Module):
    def __init__(
        self,
        channels: int,
        frequencies: str = "top16",
        dct_size: int = 7,
        reduction: float = 16,
        min_hidden: int = 8,
    ) -> None:
        super().__init__()
        pairs = selected_frequencies(frequencies)
        if (
            isinstance(dct_size, bool)
            or not isinstance(dct_size, int)
            or dct_size < BASE_GRID
            or dct_size % BASE_GRID
        ):
            raise ValueError(f"dct_size must be a positive multiple of 7, got {dct_size!r}")
        if not isinstance(reduction, (int, float)) or isinstance(reduction, bool) or reduction <= 0:
            raise ValueError(f"reduction must be a number > 0, got {reduction!r}")
        if isinstance(min_hidden, bool) or not isinstance(min_hidden, int) or min_hidden < 1:
            raise ValueError(f"min_hidden must be a positive int, got {min_hidden!r}")
        self.channels = channels
        self.frequencies = frequencies
        self.dct_size = dct_size
        scale = dct_size // BASE_GRID
        per_channel = [
            (u * scale, v * scale)
            for (u, v), size in zip(pairs, part_sizes(channels, len(pairs)), strict=True)
            for _ in range(size)
        ]
        # The frequency (u, v) of each channel: derivable, so not saved with the weights.
        self.register_buffer(
            "frequency_u", torch.tensor([u for u, _ in per_channel]), persistent=False
        )
        self.register_buffer(
            "frequency_v", torch.tensor([v for _, v in per_channel]), persistent=False
        )
        hidden = max(min_hidden, reduced_channels(channels, reduction))
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """Freq: each channel's DCT coefficient at its part's frequency, (N, C), in at least
        float32."""
        size = self.dct_size
        dtype = torch.promote_types(x.dtype, torch.float32)
        if exporting():  # the same pooling as products with (S, H) and (S, W) matrices
            pool_h = adaptive_pool_matrix(x.shape[2], size, dtype, x.device)
            pool_w = adaptive_pool_matrix(x.shape[3], size, dtype, x.device)
            pooled = pool_h @ x.to(dtype) @ pool_w.T
        else:
            pooled = x if x.shape[2:] == (size, size) else F.adaptive_avg_pool2d(x, size)
        basis_h = dct_basis(self.frequency_u, size, dtype)  # (C, S) over h
        basis_w = dct_basis(self.frequency_v, size, dtype)  # (C, S) over w
        along_w = (pooled.to(dtype) * basis_w[:, None, :]).sum(dim=3)  # (N, C, S)
        return (along_w * basis_h).sum(dim=2)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights att, shape (N, C, 1, 1)."""
        freq = self.descriptor(x).to(self.fc1.weight.dtype)
        return torch.sigmoid(self.fc2(self.act(self.fc1(freq))))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "fca")
        return x * self.gate(x).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, frequencies={self.frequencies!r}, "
            f"dct_size={self.dct_size}, hidden={self.fc1.out_features}"
        )
