"""A 4-d map as the kernels' contiguous ``[O, R, I]`` view, and pooled results back.

For a reduction over ``dims`` (``(2, 3)``: a channel gate; ``(1,)``: a spatial gate;
``(2,)``/``(3,)``: triplet's maps), in the map's memory order (NCHW, or NHWC for
channels_last) the reduced dims are one run R with O positions before it and I after it.
The pooled map (``dims`` kept at size 1) is then ``[O, I]`` in the same memory order, and
so is a gate broadcast along ``dims``. No copies: every function returns views.
"""

from __future__ import annotations

import math

import torch

_ORDER = {"nchw": (0, 1, 2, 3), "nhwc": (0, 2, 3, 1)}


def layout(x: torch.Tensor) -> str | None:
    """'nchw' or 'nhwc' (channels_last), or None for another stride pattern."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def _split(shape: tuple[int, ...], fmt: str, dims: tuple[int, ...]) -> tuple[int, int, int]:
    order = _ORDER[fmt]
    positions = [order.index(d) for d in dims]
    first, last = min(positions), max(positions)
    if last - first + 1 != len(dims):
        raise ValueError(f"dims {dims} are not adjacent in the {fmt} memory order")
    sizes = [shape[d] for d in order]
    return (
        math.prod(sizes[:first]),
        math.prod(sizes[first : last + 1]),
        math.prod(sizes[last + 1 :]),
    )


def as_ori(x: torch.Tensor, fmt: str, dims: tuple[int, ...]) -> torch.Tensor:
    """x (laid out as ``fmt``) as a contiguous ``[O, R, I]`` view."""
    return x.permute(_ORDER[fmt]).reshape(_split(tuple(x.shape), fmt, dims))


def pooled_shape(shape: torch.Size, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(shape)]


def pooled(flat: torch.Tensor, shape: torch.Size, fmt: str, dims: tuple[int, ...]) -> torch.Tensor:
    """``[O, I]`` (contiguous, memory order) -> the 4-d pooled map (``dims`` at size 1)."""
    size = pooled_shape(shape, dims)
    order = _ORDER[fmt]
    stored = flat.reshape([size[d] for d in order])
    return stored.permute([order.index(d) for d in range(4)])


def to_oi(t: torch.Tensor, fmt: str, dims: tuple[int, ...], shape: torch.Size) -> torch.Tensor:
    """A pooled-shape 4-d tensor -> contiguous ``[O, 1, I]`` float32 in memory order."""
    o, _, i = _split(tuple(shape), fmt, dims)
    t = t.expand(pooled_shape(shape, dims))
    return t.permute(_ORDER[fmt]).reshape(o, 1, i).float().contiguous()
