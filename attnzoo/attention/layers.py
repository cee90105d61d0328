"""Building blocks shared by several attention modules.

- ``reduced_channels``: the hidden width of a reduction MLP (SE, CBAM).
- ``eca_kernel_size``: ECA's kernel-size rule, Eq. (6) of the HAM paper.
- ``AdaptivePoolMix``: HAM's adaptive mix of avg- and max-pooled descriptors, Eq. (5).
- ``SpatialGate``: CBAM's spatial gate, sigmoid(BN(conv([mean_c; max_c]))).
- ``check_input``: one clear error for a wrong input shape.
- ``pooled_gate``: x * sigmoid(f(mean_d x, max_d x)) with a hand-written backward (the fused
  eager path that SE, ECA, CBAM, HAM and triplet use; see its docstring).
- ``gate_conv2d``: the spatial gates' C -> 1 k x k conv, as banded matmuls on larger maps.
- ``plain_gates``: a context in which both run as plain autograd expressions.
- ``SingleSampleSafeBatchNorm1d``: BatchNorm1d that survives a training batch of one.
- ``in_float32``, ``autocast_off``, ``conv_softmax``: the softmax-based modules compute
  their energies (what goes into a softmax) and the softmax in float32 with autocast off (see
  ``in_float32``); ``conv_softmax`` is the common case of a conv's logits.
- ``softmax_float32``, ``safe_sqrt``, ``largest_divisor_at_most``: small numeric helpers of
  the zoo's modules (a float32 softmax under autocast, a sqrt with a finite gradient at 0, the
  group count that divides C).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

REDUCTION_RULES = ("floor", "round8")
_Result = TypeVar("_Result")


def reduced_channels(channels: int, reduction: float, rule: str = "floor") -> int:
    """Hidden width of a C -> C/r -> C bottleneck.

    ``"floor"``: ``max(1, C // r)``, as in Hu et al. (SE) and Woo et al. (CBAM), and what the
    parameter columns of the HAM tables imply. ``"round8"``: timm's rule, C/r rounded to the
    nearest multiple of 8 (at least 8); on CIFAR ResNets (C = 16, 32, 64, r = 16) it gives 8
    hidden units where the floor rule gives 1, 2, 4.
    """
    if reduction <= 0:
        raise ValueError(f"reduction must be > 0, got {reduction!r}")
    if rule == "floor":
        return max(1, int(channels // reduction))
    if rule == "round8":
        value = channels / reduction
        return max(8, int(value + 4) // 8 * 8)
    raise ValueError(
        f"unknown reduction rule {rule!r}; choose one of: {', '.join(REDUCTION_RULES)}"
    )


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """k = |log2(C)/gamma + b/gamma|_odd (HAM Eq. 6, from ECA).

    The nearest odd number, with ties (t an even integer) going up, as the code listing in
    ECA's paper does (``t = int(...); k = t if t % 2 else t + 1`` is exactly that rule). The
    official repository's networks do not use it: they pass k = 3 to every module.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """max over H, W per channel, (N, C, 1, 1).

    ``F.adaptive_max_pool2d`` rather than ``amax``: same values, and its backward scatters
    the gradient to the argmax instead of building an (N, C, H, W) equality mask; on a
    CIFAR stage-1 map (128 x 16 x 32 x 32, channels_last) forward + backward takes 1.6 ms
    against 14.7 ms. At exact ties it routes the whole gradient to one of the tied
    positions (amax splits it); both are valid subgradients.
    """
    return F.adaptive_max_pool2d(x, 1)


def channel_max(x: torch.Tensor) -> torch.Tensor:
    """max over channels per position, (N, 1, H, W); ``max`` with indices (cheaper backward
    than ``amax``, same tie caveat as ``global_max_pool``)."""
    return x.max(dim=1, keepdim=True).values


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """A few-channel descriptor laid out channels_last before a k x k conv: on this CPU the
    2 -> 1 7x7 conv's forward + backward takes 22 ms that way against 56 ms contiguous
    (batch 256, 32 x 32)."""
    return x.contiguous(memory_format=torch.channels_last)


def check_input(x: torch.Tensor, channels: int, owner: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner} expects input (N, {channels}, H, W), got shape {tuple(x.shape)}")


class AdaptivePoolMix(nn.Module):
    """F_add = 1/2 (F_avg + F_max) + alpha F_avg + beta F_max   (HAM Eq. 5).

    alpha and beta are trainable, start at 0.5 and must stay inside (0, 1). We keep them
    there by construction: each is the sigmoid of an unconstrained parameter that starts
    at 0 (so alpha = beta = 0.5 at init). With ``adaptive=False`` alpha and beta are fixed at
    0.5, which gives F_add = F_avg + F_max, the plain CBAM-style sum (the "not adaptive" rows
    of HAM Table 1).
    """

    def __init__(self, adaptive: bool = True) -> None:
        super().__init__()
        self.adaptive = adaptive
        if adaptive:
            self.alpha_logit = nn.Parameter(torch.zeros(()))
            self.beta_logit = nn.Parameter(torch.zeros(()))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit) if self.adaptive else torch.tensor(0.5)

    @property
    def beta(self) -> torch.Tensor:
        return torch.sigmoid(self.beta_logit) if self.adaptive else torch.tensor(0.5)

    def forward(self, avg: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
        if not self.adaptive:
            return avg + max_
        return (0.5 + torch.sigmoid(self.alpha_logit)) * avg + (
            0.5 + torch.sigmoid(self.beta_logit)
        ) * max_


class SpatialGate(nn.Module):
    """CBAM's spatial gate: M_s = sigmoid(BN(conv_kxk([mean_c(F); max_c(F)]))), returns M_s * F.

    The conv has no bias (BN follows). The descriptor order is [mean; max]; with
    ``max_pool=False`` the descriptor is mean_c(F) alone (a one-channel conv).
    """

    def __init__(
        self, kernel_size: int = 7, max_pool: bool = True, bn_momentum: float = 0.1
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.max_pool = max_pool
        self.conv = nn.Conv2d(
            2 if max_pool else 1, 1, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum)

    def logits(self, mean: torch.Tensor, max_: torch.Tensor | None) -> torch.Tensor:
        """BN(conv([mean; max])) from the pooled maps (N, 1, H, W)."""
        pooled = mean if max_ is None else torch.cat([mean, max_], dim=1)
        return self.bn(gate_conv2d(pooled, self.conv))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return torch.sigmoid(self.logits(mean, channel_max(x) if self.max_pool else None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = ((1,), self.max_pool, self.logits)
        return pooled_gate(x, (branch,), tuple(self.parameters()))[0]


class SingleSampleSafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one sample.

    For N >= 2, or in eval mode, it is exactly ``nn.BatchNorm1d``. For N = 1 in training mode
    it computes what eval mode would and does not update the running statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


# --- the fused gate ----------------------------------------------------------------------
#
# Every gate in SE, ECA, CBAM, HAM and triplet has the form
#     out = x * mean_b sigmoid(f_b(mean_{d_b} x, max_{d_b} x))
# over one or more branches b, each pooling x over some dims d_b and mapping the pooled
# descriptors through a small learned transform f_b. Written with plain ops, autograd makes
# several full-size passes over x for it, and on a channels_last x several of them come out
# in the contiguous layout (the backward of ``mean`` and of ``max`` materialise an NCHW
# gradient), so adding them to the channels_last gradient is a strided transpose. On this CPU
# that layout mismatch, not the arithmetic, was most of the cost. ``pooled_gate`` computes
# the same values with one autograd node: it keeps x and the gate weights, runs the small
# transforms' backward with ``torch.autograd.grad``, and writes the gradient of x in x's own
# layout in one fused pass (``addcmul`` of the gate term and the broadcast mean term) plus a
# scatter of the max term to the argmax positions.

Branch = tuple  # (dims, use_max, transform): transform(mean, max_or_None) -> logits
_PLAIN = [False]


@contextlib.contextmanager
def plain_gates() -> Iterator[None]:
    """Inside, the fused gates run as plain autograd expressions (tests compare the two)."""
    _PLAIN.append(True)
    try:
        yield
    finally:
        _PLAIN.pop()


def exporting() -> bool:
    """Whether the model is being traced for export (torch.export, the ONNX exporters,
    ``torch.jit.trace``): there the modules take export-friendly paths with the same values
    (``mean``/``amax`` instead of adaptive pooling to a size read from the input, which would
    pin that size)."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether a fused gate node applies: eager mode, autograd recording, no ``plain_gates``."""
    return (
        not _PLAIN[-1]
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and any(t.requires_grad for t in tensors)
    )


def kernel_ready(x: torch.Tensor) -> bool:
    """Whether a gate on x runs on the fused kernels (``attnzoo.kernels``): eager mode, not
    exporting, no ``plain_gates``, and a kernel for x's device and dtype in the current
    ``ATTNZOO_KERNELS`` mode."""
    from .. import kernels

    return (
        not _PLAIN[-1]
        and not torch.compiler.is_compiling()
        and not exporting()
        and x.dim() == 4
        and kernels.enabled(x)
    )


def _pool(
    x: torch.Tensor, dims: tuple[int, ...], use_max: bool, indices: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """mean and max of x over ``dims`` (kept as size-1 dims), and the argmax if asked.

    The argmax is the channel for dims (1,) and the flat H*W position otherwise. Reductions
    over H and/or W go through the adaptive pooling kernels, which are several times faster
    than ``mean``/``max`` over one spatial dim on a channels_last tensor here.
    """
    _, _, h, w = x.shape
    if dims == (1,):
        mean = x.mean(dim=1, keepdim=True)
        if not use_max:
            return mean, None, None
        if indices:
            values, index = x.max(dim=1, keepdim=True)
            return mean, values, index
        return mean, channel_max(x), None
    if exporting() and not indices:  # same values; pooling to (h, 1) would pin h in a graph
        mean = x.mean(dim=dims, keepdim=True)
        return mean, x.amax(dim=dims, keepdim=True) if use_max else None, None
    size = {(2, 3): (1, 1), (3,): (h, 1), (2,): (1, w)}[dims]
    mean = x.mean(dim=(2, 3), keepdim=True) if dims == (2, 3) else F.adaptive_avg_pool2d(x, size)
    if not use_max:
        return mean, None, None
    if indices:
        values, index = F.adaptive_max_pool2d(x, size, return_indices=True)
        return mean, values, index
    return mean, F.adaptive_max_pool2d(x, size), None


def _sum(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x summed over ``dims``, kept; over one spatial dim via the (faster) pooling kernel."""
    if dims in ((2,), (3,)):
        _, _, h, w = x.shape
        size = (h, 1) if dims == (3,) else (1, w)
        return F.adaptive_avg_pool2d(x, size) * x.shape[dims[0]]
    return x.sum(dim=dims, keepdim=True)


def _scatter_max_grad(
    grad_x: torch.Tensor, dims: tuple[int, ...], index: torch.Tensor, grad_max: torch.Tensor
) -> None:
    """grad_x[argmax] += grad_max, in place."""
    if dims == (1,):
        grad_x.scatter_add_(1, index, grad_max.to(grad_x.dtype))
        return
    n, c = grad_x.shape[:2]
    # H and W merge into one dim as a view in both the NCHW and the NHWC layout.
    grad_x.view(n, c, -1).scatter_add_(
        2, index.reshape(n, c, -1), grad_max.reshape(n, c, -1).to(grad_x.dtype)
    )


def _average(gates: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean of the branches' gates, broadcast to x's shape and layout (one branch: its
    gate as it is)."""
    if len(gates) == 1:
        return gates[0]
    scaled = [gate / len(gates) for gate in gates]  # small tensors: no full-size division
    weight = torch.empty_like(x)
    torch.add(scaled[0], scaled[1], out=weight)
    for gate in scaled[2:]:
        weight.add_(gate)
    return weight


class _PooledGate(torch.autograd.Function):
    """out = x * mean_b sigmoid(f_b(pools_b(x))); see ``pooled_gate``."""

    @staticmethod
    def forward(ctx, x, branches, *params):  # noqa: ANN001, ANN205
        gates, leaves, logits, indices = [], [], [], []
        for dims, use_max, transform in branches:
            mean, max_, index = _pool(x, dims, use_max, indices=True)
            pooled = [mean.requires_grad_()] + ([max_.requires_grad_()] if use_max else [])
            with torch.enable_grad():
                out = transform(mean, max_)
            gates.append(torch.sigmoid(out.detach()))
            leaves.append(pooled)
            logits.append(out)
            indices.append(index)
        weight = _average(gates, x)
        # The gate is applied in x's dtype (a float32 gate on a bf16 map under autocast
        # gives a bf16 output, as the plain path) and returned as computed.
        applied = weight.to(x.dtype)
        ctx.branches, ctx.graph, ctx.indices = branches, (leaves, logits), indices
        ctx.params = params
        ctx.save_for_backward(x, applied, *gates)
        ctx.mark_non_differentiable(weight)
        # Without this autograd would fill a zero gradient for ``weight`` (full-size for
        # triplet) before every backward.
        ctx.set_materialize_grads(False)
        return x * applied, weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_weight):  # noqa: ANN001, ANN205
        if grad_out is None:  # the output was not used
            return (None, None, *(None for _ in ctx.params))
        x, weight, *gates = ctx.saved_tensors
        (leaves, logits), indices, branches = ctx.graph, ctx.indices, ctx.branches
        params = [p for p in ctx.params if p.requires_grad]
        # d out / d gate_b: the sum of grad * x over the dims gate_b is broadcast along.
        # grad * x goes into the buffer that then receives grad_x: one fresh full-size
        # allocation instead of two (each costs page faults on this CPU).
        buffer = torch.empty_like(x)
        same = grad_out.dtype == x.dtype
        product = torch.mul(grad_out, x, out=buffer) if same else grad_out * x
        scale = 1.0 / len(branches)
        grad_logits = [
            (_sum(product, dims) * (gate * (1 - gate) * scale)).to(out.dtype)
            for (dims, _, _), gate, out in zip(branches, gates, logits, strict=True)
        ]
        del product
        inputs = [t for pooled in leaves for t in pooled] + params
        # retain_graph: the small inner graph lives as long as this node (retain_graph on the
        # outer backward may call this again); it is freed with the node.
        grads = torch.autograd.grad(
            logits, inputs, grad_logits, allow_unused=True, retain_graph=True
        )
        grads = list(grads)
        pooled_grads, param_grads = (
            grads[: len(grads) - len(params)],
            grads[len(grads) - len(params) :],
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            # grad * weight + the mean terms (broadcast), in one pass, then the max terms.
            terms = []
            for dims, use_max, _ in branches:
                grad_mean = pooled_grads.pop(0)
                grad_max = pooled_grads.pop(0) if use_max else None
                count = math.prod(x.shape[d] for d in dims)
                terms.append((grad_mean, count, grad_max))
            grad_x = buffer
            means = [(g / n).to(x.dtype) for g, n, _ in terms if g is not None]
            torch.addcmul(means[0] if means else x.new_zeros(()), grad_out, weight, out=grad_x)
            for mean_term in means[1:]:
                grad_x.add_(mean_term)
            for (dims, _, _), (_, _, grad_max), index in zip(branches, terms, indices, strict=True):
                if grad_max is not None:
                    _scatter_max_grad(grad_x, dims, index, grad_max)
        by_param = dict(zip(map(id, params), param_grads, strict=True))
        return (grad_x, None, *(by_param.get(id(p)) for p in ctx.params))


def _plain_gate(x: torch.Tensor, branches: tuple[Branch, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gates = []
    for dims, use_max, transform in branches:
        mean, max_, _ = _pool(x, dims, use_max, indices=False)
        gates.append(torch.sigmoid(transform(mean, max_)))
    weight = gates[0] if len(gates) == 1 else sum(gates[1:], gates[0]) / len(gates)
    return x * weight.to(x.dtype), weight


def pooled_gate(
    x: torch.Tensor, branches: tuple[Branch, ...], params: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * w, w) with w = mean over branches of sigmoid(transform(mean_d(x), max_d(x))).

    On the fused kernels (``attnzoo.kernels``; ``fused.py``) a multi-branch gate (triplet)
    returns (x * w, None): the averaged gate is never formed there.

    Each branch is ``(dims, use_max, transform)``: dims one of (2, 3) (a channel gate),
    (1,) (a spatial gate), (2,) or (3,) (triplet's C-W and C-H maps); ``transform(mean,
    max)`` gets the pooled descriptors with the pooled dims kept at size 1 (``max`` is None
    without ``use_max``) and returns logits broadcastable to x. ``params`` are the
    parameters the transforms use (they get their gradients through this node). ``w`` is
    applied in x's dtype and returned in the logits' (so a transform that computes its
    logits in float32 under autocast, as HAM's, gets a bf16 product and a float32 gate).

    With autograd recording, in eager mode, this is one ``autograd.Function`` (see the note
    above); the values equal the plain expression's to float rounding and the gradients are
    the same, max ties included (the gradient goes to the one position the pooling kernel
    returns as argmax, as with ``global_max_pool``/``channel_max``). Without grad, or under
    ``torch.compile`` (whose compiler fuses the plain expression itself), it is the plain
    expression.
    """
    if kernel_ready(x):
        from . import fused  # the kernels' nodes (attention/fused.py)

        if len(branches) == 1:
            return fused.kernel_gate(x, branches[0], params)
        if fused.tri_ready(x, branches):
            return fused.kernel_tri_gate(x, branches, params), None
    if not use_fused(x, *params):
        return _plain_gate(x, branches)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    return _PooledGate.apply(x, branches, *params)


# --- the few-channel k x k conv of the spatial gates ---------------------------------------
#
# The spatial gates convolve a 1- or 2-channel descriptor map to one channel with a k x k
# kernel (7 x 7 by default). oneDNN leaves most of its vector lanes idle on that shape (one
# output channel): at 128 x 2 x 32 x 32 its forward + backward took 11.5 ms here, more than
# the gate's elementwise work. ``gate_conv2d`` computes the same cross-correlation as k * C
# batched matrix products: kernel row i of channel c applied to the zero-padded rows
# x[:, c, i : i + H, :] (B x H x (W + k - 1)) is a product with a banded (Toeplitz)
# (W + k - 1) x W matrix that holds that kernel row on its diagonals. The input gradient is
# the same kind of product with the kernel turned 180 degrees, the weight gradient a sum of
# rows^T grad products. Measured forward + backward (1 thread): 6.7 ms against 11.5 ms at
# 128 x 2 x 32 x 32, 2.8 against 5.5 at 128 x 2 x 32 x 16, 1.9 against 2.7 at 16 x 16; below
# 16 x 16 positions per map the conv itself is faster, and is used.
BANDED_MIN_POSITIONS = 256


def _banded(kernel: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, offsets, valid) for kernel (C, k, k): T[c, i, u, w] = kernel[c, i, u - w] where
    0 <= u - w < k, else 0; u indexes the W + k - 1 padded columns."""
    k = kernel.shape[-1]
    u = torch.arange(width + k - 1, device=kernel.device).view(-1, 1)
    offsets = u - torch.arange(width, device=kernel.device).view(1, -1)
    valid = (offsets >= 0) & (offsets < k)
    offsets = offsets.clamp(0, k - 1)
    return kernel[:, :, offsets] * valid, offsets, valid


def _banded_correlate(padded: torch.Tensor, banded: torch.Tensor, height: int) -> torch.Tensor:
    """sum over c, i of padded[:, c, i : i + H, :] @ banded[c, i]: (B, H, W)."""
    b, c = padded.shape[:2]
    k = banded.shape[1]
    y = torch.empty(b, height, banded.shape[-1], dtype=padded.dtype, device=padded.device)
    for ci in range(c):
        for i in range(k):
            rows, band = padded[:, ci, i : i + height, :], banded[ci, i].expand(b, -1, -1)
            if ci == 0 and i == 0:
                torch.bmm(rows, band, out=y)
            else:
                y.baddbmm_(rows, band)
    return y


class _GateConv2d(torch.autograd.Function):
    """conv2d(x, weight, padding=k // 2) for x (B, C, H, W), weight (1, C, k, k), no bias."""

    @staticmethod
    def forward(ctx, x, weight):  # noqa: ANN001, ANN205
        _, _, h, w = x.shape
        p = weight.shape[-1] // 2
        padded = F.pad(x, (p, p, p, p)).contiguous()
        y = _banded_correlate(padded, _banded(weight[0], w)[0], h)
        ctx.save_for_backward(padded, weight)
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return y.unsqueeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        padded, weight = ctx.saved_tensors
        c, k = weight.shape[1], weight.shape[-1]
        p = k // 2
        g = grad_y[:, 0].contiguous()  # (B, H, W)
        h, w = g.shape[1:]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # The input gradient correlates grad with the kernel turned 180 degrees.
            padded_grad = F.pad(g.unsqueeze(1), (p, p, p, p)).contiguous()
            turned = _banded(weight[0].flip(-1, -2), w)[0]  # (C, k, W + k - 1, W)
            grad_x = torch.stack(
                [_banded_correlate(padded_grad, turned[ci : ci + 1], h) for ci in range(c)], 1
            )
            if ctx.channels_last:
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if ctx.needs_input_grad[1]:
            _, offsets, valid = _banded(weight[0], w)
            grad_band = torch.stack(
                [
                    torch.bmm(padded[:, ci, i : i + h, :].transpose(1, 2), g).sum(0)
                    for ci in range(c)
                    for i in range(k)
                ]
            ).view(c, k, w + k - 1, w)
            grad_w = torch.zeros(c, k, k, dtype=grad_band.dtype, device=grad_band.device)
            index = offsets.expand(c, k, -1, -1).reshape(c, k, -1)
            grad_w.scatter_add_(2, index, (grad_band * valid).reshape(c, k, -1))
            grad_w = grad_w.unsqueeze(0)
        return grad_x, grad_w


def gate_conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a spatial gate's bias-free C -> 1 k x k conv with "same" padding.

    In eager mode on the CPU it runs on the C++ kernel of ``attnzoo.kernels``
    (``fused.kernel_conv2d``) where the kernels are on, in float32 (also under bf16
    autocast: the descriptor maps are small, and the float32 logits are what the gates'
    sigmoid gets anyway). Without the kernels, in float32 and for maps of at least
    ``BANDED_MIN_POSITIONS`` positions, it runs as banded matrix products (see above; same
    values to float rounding); otherwise (small maps, CUDA, ``torch.compile``,
    ``plain_gates``, autocast without the kernels) it is the conv on a channels_last input.
    """
    k = conv.kernel_size[0]
    if (
        _PLAIN[-1]
        or torch.compiler.is_compiling()
        or exporting()
        or x.device.type != "cpu"
        or conv.bias is not None
        or (conv.out_channels, conv.groups) != (1, 1)
        or conv.kernel_size != (k, k)
        or conv.padding != (k // 2, k // 2)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
    ):
        return conv(conv_input(x))
    if conv.weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16):
        if kernel_ready(x):
            from .fused import kernel_conv2d  # the C++ conv (attention/fused.py)

            return kernel_conv2d(x.float(), conv.weight)
    if (
        torch.is_autocast_enabled(x.device.type)
        or x.dtype != conv.weight.dtype
        or x.shape[2] * x.shape[3] < BANDED_MIN_POSITIONS
    ):
        return conv(conv_input(x))
    return _GateConv2d.apply(x, conv.weight)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` where autocast is on for that device
    type; otherwise a null context (nothing to turn off, and ``torch.autocast`` raises for a
    device type without autocast, such as ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 if its dtype is a narrower float (bf16, fp16); float32, float64 and
    integer tensors as they are (no copy)."""
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        return t.float()
    return t


def in_float32(fn: Callable[..., _Result]) -> Callable[..., _Result]:
    """Decorator: ``fn`` runs with autocast off on its first tensor argument's device type
    and every bf16/fp16 tensor argument promoted to float32 (``at_least_float32``). The result
    is float32 (or float64): the caller casts it back where it should be narrower.

    The softmax-based modules (DANet's PAM and CAM, CSM, RCCA, non-local, A^2, GC, polarized,
    EMA, the spatial softmax) compute their energies (the products that go into a softmax:
    q . k, or a conv's logits) and the softmax with it. Under fp16 autocast an energy above
    65504 is inf, and a softmax row holding an inf is NaN; in bf16 (8 significant bits) an
    energy e is rounded by up to |e| 2^-8, which scales its softmax weight by exp(|e| 2^-8),
    a large factor once |e| is in the hundreds. Outside autocast, and for float32 or
    float64 arguments, it changes nothing: the same ops run on the same tensors.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with autocast_off(device_type):
            return fn(
                *(at_least_float32(a) if isinstance(a, torch.Tensor) else a for a in args),
                **kwargs,
            )

    return wrapper


def conv_softmax(conv: nn.Conv2d, x: torch.Tensor, dim: int, start_dim: int = 2) -> torch.Tensor:
    """softmax along ``dim`` of ``conv(x).flatten(start_dim)``: logits computed by a conv and
    normalised over positions (the default flattening, (N, C_out, H W), with dim -1) or over
    the conv's output channels (dim 1). The conv (it computes the energies) and the softmax
    run in float32 at least (``in_float32``); the result is float32 (float64 for a float64
    input)."""
    return _conv_softmax(
        x,
        conv.weight,
        conv.bias,
        (conv.stride, conv.padding, conv.dilation, conv.groups),
        start_dim,
        dim,
    )


@in_float32
def _conv_softmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple,
    start_dim: int,
    dim: int,
) -> torch.Tensor:
    logits = F.conv2d(x, weight, bias, *geometry)
    return torch.softmax(logits.flatten(start_dim), dim=dim)


def softmax_float32(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax in float32 at least (float64 stays float64), cast back to the logits' dtype."""
    return torch.softmax(logits, dim, dtype=torch.promote_types(logits.dtype, torch.float32)).to(
        logits.dtype
    )


def safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt(value) for value >= 0, with gradient 0 (not NaN) where value == 0."""
    positive = value > 0
    return torch.where(positive, torch.where(positive, value, 1.0).sqrt(), 0.0)


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of ``number`` that is <= ``limit`` (1 if ``limit`` < 1)."""
    return max(d for d in range(1, max(1, min(number, limit)) + 1) if number % d == 0)
