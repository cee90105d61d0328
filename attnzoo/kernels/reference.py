"""The gate kernels' contract, written as plain PyTorch (the specification the C++ and Triton
kernels are tested against, and the path taken where neither applies).

Every gate of the family in ``attention/layers.py`` (SE, ECA, CBAM, HAM, triplet) reduces a
4-d map over one dim (or over H and W together) and multiplies the map by a gate broadcast
along the reduced dims. In memory order, for either layout (NCHW or channels_last), that is a
contiguous ``[O, R, I]`` view: R is the reduced extent, O the positions before it, I those
after it (``views.as_ori``). Example: a channel gate on a channels_last map is
``[N, H*W, C]``; a spatial gate (over C) on an NCHW map is ``[N, C, H*W]``.

HAM's separated spatial gate reduces over C in two groups of channels (each sample's
important and subimportant channels): ``groups`` is an int8 ``[N, R]`` table of group ids
in ``0..G-1`` and sample n owns the rows ``o`` with ``o // (O // N) == n``. Without groups,
G = 1.

The four operations, with sums in float32 and results per (o, g, i):

- ``pool(x, groups, G, want_max)`` -> ``sum [O, G, I]`` float32, and with ``want_max`` the
  max ``[O, G, I]`` (float32) and its argmax r (int32). Ties go to the lowest r; a NaN is
  the max (the first NaN). A group with no member has sum 0, max -inf and argmax -1.
- ``dot(grad, x, groups, G)`` -> ``sum_r grad * x`` per group, float32 ``[O, G, I]``.
- ``apply(x, gate, groups, G)`` -> ``x * gate[o, g(r), i]`` with the gate rounded to x's
  dtype first, as ``x * gate.to(x.dtype)`` (so bf16 results equal PyTorch's).
- ``backward(grad, gate, groups, G, bias, argmax, dmax)`` -> ``grad * gate + bias +
  [r == argmax] * dmax`` per element, in float32, rounded once to grad's dtype (``bias``,
  ``argmax`` and ``dmax`` may be None).
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 input (the tests' exact reference)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _group_index(groups: torch.Tensor | None, o: int, r: int) -> torch.Tensor | None:
    """The group id of every (o, r), int64 [O, R] (None without groups)."""
    if groups is None:
        return None
    n = groups.shape[0]
    sample = torch.arange(o, device=groups.device) // (o // n)
    return groups.long()[sample]


def _expand(t: torch.Tensor, index: torch.Tensor | None, r: int) -> torch.Tensor:
    """[O, G, I] -> [O, R, I]: each (o, r, i) gets its group's value."""
    if index is None:
        return t.expand(t.shape[0], r, t.shape[2])
    return t.gather(1, index[:, :, None].expand(-1, -1, t.shape[2]))


def pool(
    x: torch.Tensor, groups: torch.Tensor | None, g: int, want_max: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    o, r, i = x.shape
    index = _group_index(groups, o, r)
    xf = _wide(x)
    sums, maxes, args = [], [], []
    positions = torch.arange(r, device=x.device).view(1, r, 1)
    for group in range(g):
        member = (
            torch.ones(o, r, 1, dtype=torch.bool, device=x.device)
            if index is None
            else (index == group)[:, :, None]
        )
        sums.append(torch.where(member, xf, 0).sum(1))
        if want_max:
            nan = member & xf.isnan()
            candidate = torch.where(member, xf, float("-inf"))
            top = candidate.amax(1, keepdim=True)
            hit = torch.where(nan.any(1, keepdim=True), nan, member & (candidate == top))
            first = torch.where(hit, positions, r).amin(1)
            top = torch.where(nan.any(1, keepdim=True), float("nan"), top).squeeze(1)
            maxes.append(top)
            args.append(torch.where(first == r, -1, first))
    stack = lambda ts: torch.stack(ts, 1)  # noqa: E731
    if not want_max:
        return stack(sums), None, None
    return stack(sums), stack(maxes), stack(args).int()


def dot(grad: torch.Tensor, x: torch.Tensor, groups: torch.Tensor | None, g: int) -> torch.Tensor:
    return pool(_wide(grad) * _wide(x), groups, g, False)[0]


def apply(x: torch.Tensor, gate: torch.Tensor, groups: torch.Tensor | None, g: int) -> torch.Tensor:
    o, r, i = x.shape
    return x * _expand(gate.to(x.dtype), _group_index(groups, o, r), r)


def backward(
    grad: torch.Tensor,
    gate: torch.Tensor,
    groups: torch.Tensor | None,
    g: int,
    bias: torch.Tensor | None = None,
    argmax: torch.Tensor | None = None,
    dmax: torch.Tensor | None = None,
) -> torch.Tensor:
    o, r, i = grad.shape
    index = _group_index(groups, o, r)
    out = _wide(grad) * _expand(_wide(gate.to(grad.dtype)), index, r)
    if bias is not None:
        out = out + _expand(bias.to(out.dtype), index, r)
    if argmax is not None and dmax is not None:
        positions = torch.arange(r, device=grad.device).view(1, r, 1)
        hit = _expand(argmax.long(), index, r) == positions
        out = out + torch.where(hit, _expand(dmax.to(out.dtype), index, r), 0)
    return out.to(grad.dtype)
