"""The pooled gate of SE, ECA, CBAM and HAM's channel attention on the fused kernels
(``attnzoo.kernels``), for training and inference.

``out = x * sigmoid(f(mean_d x, max_d x))`` (SE Eq. 2-4, ECA Eq. 1 with the HAM paper's
Eq. 6, CBAM Eq. 2-3, HAM Eq. 5-7), with d the reduced dims of one branch. Passes over x:

- forward: ``pool`` reads x once for the mean, the max and its argmax; ``apply`` reads x and
  writes the output;
- backward: ``dot`` reads grad and x for ``sum_d grad * x`` (the gate's gradient, never
  stored full-size); ``backward`` reads grad and writes ``grad * w + d mean / |d| + [argmax]
  * d max`` in one pass.

The small transform f (an MLP, a 1-d conv, a k x k conv) runs as ordinary autograd on the
pooled descriptors, inside this node. Values equal the plain expression's to float
rounding; a max tie sends the gradient to the lowest index along d (for a channel gate, the
first position in row-major H x W order), which is one valid subgradient (the plain path's
pooling kernel picks its own). Without grad (inference), ``kernel_gate`` takes the same
two forward passes.

``kernel_conv2d``: the spatial gates' C -> 1 k x k conv (CBAM Eq. 3's f^{7x7}, HAM Eq. 10's
shared conv, triplet's three branch convs) on the C++ kernel, forward and both gradients:
direct loops over the k x k taps, vectorised along W (oneDNN leaves most vector lanes idle
with one output channel, and the banded-matmul route of ``layers.gate_conv2d`` does k times
the multiplies it needs).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import cpu, views


def _descriptors(x, x3, fmt, dims, use_max):  # noqa: ANN001, ANN202
    total, top, arg = kernels.pool(x3, None, 1, use_max)
    count = x3.shape[1]
    mean = views.pooled(total / count, x.shape, fmt, dims).to(x.dtype)
    top = views.pooled(top, x.shape, fmt, dims).to(x.dtype) if use_max else None
    return mean, top, arg


class _KernelGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, fmt, *params):  # noqa: ANN001, ANN205
        dims, use_max, transform = branch
        x3 = views.as_ori(x, fmt, dims)
        mean, top, arg = _descriptors(x, x3, fmt, dims, use_max)
        leaves = [mean.requires_grad_()] + ([top.requires_grad_()] if use_max else [])
        with torch.enable_grad():
            logits = transform(mean, top)
        weight = torch.sigmoid(logits.detach())
        gate = views.to_oi(weight, fmt, dims, x.shape)
        out = torch.empty_like(x)  # not a view: callers may add to it in place (timm)
        kernels.apply(x3, gate, None, 1, out=views.as_ori(out, fmt, dims))
        ctx.branch, ctx.fmt, ctx.params = branch, fmt, params
        ctx.graph = (leaves, logits)
        ctx.save_for_backward(x, gate, arg)
        ctx.mark_non_differentiable(weight)
        ctx.set_materialize_grads(False)
        return out, weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_weight):  # noqa: ANN001, ANN205
        if grad_out is None:
            return (None, None, None, *(None for _ in ctx.params))
        x, gate, arg = ctx.saved_tensors
        (dims, use_max, _), fmt = ctx.branch, ctx.fmt
        leaves, logits = ctx.graph
        grad_out = grad_out.to(x.dtype)
        memory = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
        if not grad_out.is_contiguous(memory_format=memory):
            grad_out = grad_out.contiguous(memory_format=memory)
        x3, g3 = views.as_ori(x, fmt, dims), views.as_ori(grad_out, fmt, dims)
        grad_gate = views.pooled(kernels.dot(g3, x3, None, 1), x.shape, fmt, dims)
        weight = views.pooled(gate, x.shape, fmt, dims)
        grad_logits = (grad_gate * weight * (1 - weight)).sum_to_size(logits.shape)
        params = [p for p in ctx.params if p.requires_grad]
        # retain_graph: the small inner graph lives as long as this node (see _PooledGate).
        grads = torch.autograd.grad(
            logits,
            leaves + params,
            grad_logits.to(logits.dtype),
            allow_unused=True,
            retain_graph=True,
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            count = x3.shape[1]
            grad_mean = grads[0]
            grad_max = grads[1] if use_max else None
            bias = None if grad_mean is None else views.to_oi(grad_mean / count, fmt, dims, x.shape)
            dmax = None if grad_max is None else views.to_oi(grad_max, fmt, dims, x.shape)
            grad_x = torch.empty_like(x)
            kernels.backward(
                g3,
                gate,
                None,
                1,
                bias,
                arg if dmax is not None else None,
                dmax,
                out=views.as_ori(grad_x, fmt, dims),
            )
        by_param = dict(zip(map(id, params), grads[len(leaves) :], strict=True))
        return (grad_x, None, None, *(by_param.get(id(p)) for p in ctx.params))


def gate_layout(x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """x in a layout the kernels read ('nchw' or 'nhwc'), made contiguous if it is neither."""
    fmt = views.layout(x)
    if fmt is None:
        x, fmt = x.contiguous(), "nchw"
    return x, fmt


def kernel_gate(x: torch.Tensor, branch: tuple, params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * w, w) for one branch through the kernels: the autograd node when grad is being
    recorded, else the two forward passes (inference)."""
    x, fmt = gate_layout(x)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _KernelGate.apply(x, branch, fmt, *params)
    dims, use_max, transform = branch
    x3 = views.as_ori(x, fmt, dims)
    mean, top, _ = _descriptors(x, x3, fmt, dims, use_max)
    weight = torch.sigmoid(transform(mean, top))
    gate = views.to_oi(weight, fmt, dims, x.shape)
    out = torch.empty_like(x)
    kernels.apply(x3, gate, None, 1, out=views.as_ori(out, fmt, dims))
    return out, weight


class _KernelConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # noqa: ANN001, ANN205
        x = x.contiguous()
        kernel = weight[0].contiguous()
        ctx.save_for_backward(x, kernel)
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return cpu.conv(x, kernel).unsqueeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, kernel = ctx.saved_tensors
        g = grad_y[:, 0].float().contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = cpu.conv_grad_input(g, kernel, x.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = cpu.conv_grad_weight(g, x, kernel.shape[-1]).unsqueeze(0)
        return grad_x, grad_w


def kernel_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv2d(x, weight, padding=k // 2) for a float32 CPU x (B, C, H, W) and weight
    (1, C, k, k), on the C++ kernel; (B, 1, H, W)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _KernelConv2d.apply(x, weight)
    return cpu.conv(x.contiguous(), weight[0].contiguous()).unsqueeze(1)


# --- several single-dim branches at once (triplet attention) -------------------------------
#
# Triplet (Misra et al., WACV 2021, Eq. 1-3) gates a map by the mean of three gates, pooled
# over C, H and W. In memory order the map is [N, D1, D2, D3] (NCHW: C, H, W; NHWC: H, W, C);
# ``cpu.tri_pool`` reduces over all three dims in one pass, ``cpu.tri_dot`` forms the three
# gate gradients in one pass, and ``cpu.tri_broadcast`` applies the summed gates (or forms
# the input gradient with the three mean and max terms) in one pass: 4 passes over the map
# for forward and backward, against about 12 on the PyTorch path.
_SLOTS = {"nchw": {1: 0, 2: 1, 3: 2}, "nhwc": {2: 0, 3: 1, 1: 2}}


def tri_ready(x: torch.Tensor, branches: tuple) -> bool:
    """Whether ``branches`` fit the triplet kernels: 2-3 branches, each over one distinct
    non-batch dim, all with or all without max pooling, a CPU map."""
    dims = [d for d, _, _ in branches]
    return (
        x.device.type == "cpu"
        and 1 < len(branches) <= 3
        and all(len(d) == 1 and d[0] in (1, 2, 3) for d in dims)
        and len({d[0] for d in dims}) == len(dims)
        and len({use_max for _, use_max, _ in branches}) == 1
    )


def _which(fmt: str, branches: tuple) -> tuple[bool, bool, bool]:
    """Which of the memory-order dims D1, D2, D3 the branches reduce."""
    slots = {_SLOTS[fmt][dims[0]] for dims, _, _ in branches}
    return tuple(k in slots for k in range(3))


def _tri_descriptors(x, x4, fmt, branches):  # noqa: ANN001, ANN202
    use_max = branches[0][1]
    pooled = cpu.tri_pool(x4, _which(fmt, branches), use_max)
    out = []
    for dims, _, _ in branches:
        total, top, arg = pooled[_SLOTS[fmt][dims[0]]]
        mean = views.pooled(total / x.shape[dims[0]], x.shape, fmt, dims).to(x.dtype)
        top = views.pooled(top, x.shape, fmt, dims).to(x.dtype) if use_max else None
        out.append((mean, top, arg))
    return out


def _tri_terms(fmt, branches, per_branch):  # noqa: ANN001, ANN202
    """The kernels' per-slot term tuples from per-branch ones."""
    terms = [None, None, None]
    for (dims, _, _), term in zip(branches, per_branch, strict=True):
        terms[_SLOTS[fmt][dims[0]]] = term
    return terms


def _as_memory(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return x.permute(views._ORDER[fmt])


class _KernelTriGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branches, fmt, *params):  # noqa: ANN001, ANN205
        x4 = _as_memory(x, fmt)
        leaves, logits, scaled, args = [], [], [], []
        for (dims, _, transform), (mean, top, arg) in zip(
            branches, _tri_descriptors(x, x4, fmt, branches), strict=True
        ):
            pooled = [mean.requires_grad_()] + ([top.requires_grad_()] if top is not None else [])
            with torch.enable_grad():
                out = transform(mean, top)
            leaves.append(pooled)
            logits.append(out)
            gate = torch.sigmoid(out.detach())
            scaled.append(views.to_oi(gate, fmt, dims, x.shape) / len(branches))
            args.append(arg)
        terms = _tri_terms(fmt, branches, [(g, None, None, None) for g in scaled])
        ctx.branches, ctx.fmt, ctx.params = branches, fmt, params
        ctx.graph = (leaves, logits)
        ctx.save_for_backward(x, *scaled, *(a if a is not None else x.new_empty(0) for a in args))
        ctx.set_materialize_grads(False)
        out = torch.empty_like(x)  # not a view: callers may add to it in place (timm)
        cpu.tri_broadcast(x4, terms, out=_as_memory(out, fmt))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        if grad_out is None:
            return (None, None, None, *(None for _ in ctx.params))
        branches, fmt = ctx.branches, ctx.fmt
        x, *rest = ctx.saved_tensors
        nb = len(branches)
        scaled, args = rest[:nb], rest[nb:]
        leaves, logits = ctx.graph
        memory = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
        grad_out = grad_out.to(x.dtype)
        if not grad_out.is_contiguous(memory_format=memory):
            grad_out = grad_out.contiguous(memory_format=memory)
        x4, g4 = _as_memory(x, fmt), _as_memory(grad_out, fmt)
        dots = cpu.tri_dot(g4, x4, _which(fmt, branches))
        grad_logits = []
        for (dims, _, _), gate, out in zip(branches, scaled, logits, strict=True):
            grad_gate = views.pooled(dots[_SLOTS[fmt][dims[0]]], x.shape, fmt, dims)
            w = views.pooled(gate, x.shape, fmt, dims) * nb
            grad_logits.append((grad_gate * w * (1 - w) / nb).sum_to_size(out.shape).to(out.dtype))
        params = [p for p in ctx.params if p.requires_grad]
        inputs = [t for pooled in leaves for t in pooled] + params
        grads = list(
            torch.autograd.grad(logits, inputs, grad_logits, allow_unused=True, retain_graph=True)
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            per_branch = []
            for (dims, use_max, _), gate, arg in zip(branches, scaled, args, strict=True):
                grad_mean = grads.pop(0)
                grad_max = grads.pop(0) if use_max else None
                bias = (
                    None
                    if grad_mean is None
                    else views.to_oi(grad_mean / x.shape[dims[0]], fmt, dims, x.shape)
                )
                dmax = None if grad_max is None else views.to_oi(grad_max, fmt, dims, x.shape)
                per_branch.append((gate, bias, arg if dmax is not None else None, dmax))
            grad_x = torch.empty_like(x)
            cpu.tri_broadcast(
                g4, _tri_terms(fmt, branches, per_branch), out=_as_memory(grad_x, fmt)
            )
        else:
            grads = grads[sum(1 + b[1] for b in branches) :]
        param_grads = grads[len(grads) - len(params) :] if params else []
        by_param = dict(zip(map(id, params), param_grads, strict=True))
        return (grad_x, None, None, *(by_param.get(id(p)) for p in ctx.params))


def kernel_tri_gate(x: torch.Tensor, branches: tuple, params: tuple) -> torch.Tensor:
    """x * mean_b sigmoid(f_b(pools_b(x))) for triplet's branches on the kernels (see
    ``tri_ready``); the averaged gate itself is never formed."""
    x, fmt = gate_layout(x)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _KernelTriGate.apply(x, branches, fmt, *params)
    scaled = []
    for (dims, _, transform), (mean, top, _) in zip(
        branches, _tri_descriptors(x, _as_memory(x, fmt), fmt, branches), strict=True
    ):
        gate = torch.sigmoid(transform(mean, top))
        scaled.append(views.to_oi(gate, fmt, dims, x.shape) / len(branches))
    terms = _tri_terms(fmt, branches, [(g, None, None, None) for g in scaled])
    out = torch.empty_like(x)
    cpu.tri_broadcast(_as_memory(x, fmt), terms, out=_as_memory(out, fmt))
    return out
