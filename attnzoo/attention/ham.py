"""HAM: Hybrid Attention Module (Li, Fang, Zha, Gao, Zheng, Pattern Recognition, 2022).

The module refines F (N, C, H, W) in two steps (HAM Eqs. 1-4):
    F'  = A_C(F) * F                                 (Eq. 1, channel refined feature)
    F'_1 + F'_2 = F'                                 (Eq. 2, channel separation)
    F''_i = A_S,i(F'_i) * F'_i,  i = 1, 2            (Eq. 3)
    F'' = F''_1 + F''_2                              (Eq. 4, output)

Channel attention (Eqs. 5-7):
    F_add = 1/2 (F_avg + F_max) + alpha F_avg + beta F_max      (Eq. 5)
    k = |log2(C)/gamma + b/gamma|_odd, gamma = 2, b = 1          (Eq. 6)
    A_C = sigmoid(C1D_k(F_add))                                  (Eq. 7)
alpha, beta trainable, initialised to 0.5, kept in (0, 1) by a sigmoid reparametrisation
(see ``AdaptivePoolMix``). The 1-D conv has no bias (as in ECA).

Channel separation (Eq. 8, Algorithm 1):
    C_im = |lambda * C|_even, lambda = 0.6
The important group is, per sample, the C_im channels with the largest A_C values; the
mask multiplies F' (F'_1 = mask * F', F'_2 = (1 - mask) * F'), so channel order is kept.

Spatial attention (Eqs. 9-10), Phi = BN -> ReLU -> sigmoid:
    A_S,i = Phi(C2D_7x7([AvgPool_c(F'_i); MaxPool_c(F'_i)]))
AvgPool_c of group 1 divides the channel sum by C_im, of group 2 by C - C_im (the paper
says so explicitly). One 7x7 conv (2 -> 1 channels, no bias) and one BN are shared by
both groups.

Choices the paper leaves open, and ours:
- |t|_even: nearest even number, ties (t odd) rounded up. C_im must leave both groups
  non-empty (0 < C_im < C), else the constructor raises ValueError.
- Ties in A_C at the boundary: Algorithm 1 marks every value >= the C_im-th largest as
  important, which could give more than C_im channels; we take exactly C_im channels via
  a stable descending sort (ties broken by the lowest channel index), so the divisors of the group averages are exact.
- MaxPool_c(F'_i) is taken over the masked tensor F'_i, zeros of the other group
  included, exactly as Eqs. 9-10 read with F'_i = mask * F'.
- BN statistics: the two groups' descriptors pass the shared conv and BN as one batch of
  2N maps, so BN normalises both groups with the same statistics.
- Note that Phi ends with ReLU then sigmoid, so spatial weights lie in [0.5, 1).

Ablation switches (HAM Tables 1-3): ``adaptive`` (alpha/beta mix on/off), ``kernel_size``
(3/5/7), ``separation_rate`` (lambda), ``spatial`` in {"ham", "cbam", None}: "cbam" uses
CBAM's spatial gate on F' ("HAM(channel)&CBAM(spatial)"), None is channel attention only
("HAM (channel)"). ``eca_kernel`` fixes the 1-D kernel instead of Eq. 6.

Mixed precision: the channel logits C1D_k(F_add) (N x C values) and their sigmoid run in
float32 with autocast off (``layers.in_float32``), and the gate is applied in the input's
dtype. The channels are ranked on these weights: rounded to bf16 (8 significant bits, a
step of 2^-8 between 0.5 and 1), nearby gate values tie, and the stable sort would then split
the groups by channel index instead of by attention (on 16 channels, most samples had a tie).

Implementation: in training, the channel step is one fused autograd node
(``layers.pooled_gate``) and so is the separation + spatial step (``_SeparatedSpatialGate``):
the same values and gradients as the plain expression in ``HAMSpatialAttention.maps``,
with fewer passes over the feature map. The group sums are one batched matmul with the
(N, C, 2) group indicator; each group's channel max is taken over the channels of that group
(gathered important-first), then max'ed with 0, which is the max over the masked tensor
F'_i (its other group's channels are zeros).

On the CPU (float32, bf16) and on CUDA (Triton) both steps run on the fused gate kernels of
``attnzoo.kernels`` instead (``attention/fused.py`` for the channel step,
``_KernelSeparatedGate`` here): one grouped pass gives both groups' channel sums, maxes and
argmaxes (the int8 (N, C) group table replaces the gather), one pass applies
where(mask, A_S,1, A_S,2), and backward is one grouped dot pass and one pass for the input
gradient. A tie for a group's max sends its gradient to the lowest channel index there (the
PyTorch node: the highest-weighted). ``ATTNZOO_KERNELS=off`` or ``layers.plain_gates()``
selects the PyTorch paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import views
from ..registry import register_attention
from .fused import gate_layout
from .layers import (
    AdaptivePoolMix,
    SpatialGate,
    autocast_off,
    channel_max,
    check_input,
    conv_input,
    eca_kernel_size,
    exporting,
    gate_conv2d,
    global_max_pool,
    in_float32,
    kernel_ready,
    pooled_gate,
    use_fused,
)

SPATIAL_CHOICES = ("ham", "cbam", None)


def nearest_even(t: float) -> int:
    """|t|_even: the nearest even integer, ties (odd integers) rounded up."""
    return 2 * int((t + 1) // 2)


def important_channel_count(channels: int, separation_rate: float) -> int:
    """C_im = |C * lambda|_even (HAM Eq. 8)."""
    # Round away float noise first: 90 * 0.7 is 62.99999999999999, a tie that must go up.
    return nearest_even(round(channels * separation_rate, 9))


class HAMChannelAttention(nn.Module):
    """A_C(F) = sigmoid(C1D_k(F_add)) (HAM Eq. 7); returns weights (N, C, 1, 1)."""

    def __init__(
        self, channels: int, adaptive: bool = True, kernel_size: int | None = None
    ) -> None:
        super().__init__()
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels)
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"eca_kernel must be a positive odd int, got {k!r}")
        self.mix = AdaptivePoolMix(adaptive)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def logits(self, avg: torch.Tensor, max_: torch.Tensor) -> torch.Tensor:
        """C1D_k(F_add) from the pooled (N, C, 1, 1) descriptors, same shape; in float32 at
        least (see the module docstring: the channels are ranked on these)."""
        n, c = avg.shape[:2]
        return self._logits(avg.view(n, c), max_.view(n, c), self.conv.weight).view(n, c, 1, 1)

    @in_float32
    def _logits(self, avg: torch.Tensor, max_: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        f_add = self.mix(avg, max_)
        return F.conv1d(f_add.unsqueeze(1), weight.to(f_add.dtype), padding=self.conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.logits(avg, global_max_pool(x)))

    def refine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F' = A_C(F) * F, A_C(F)) through the fused gate."""
        return pooled_gate(x, (((2, 3), True, self.logits),), tuple(self.parameters()))


class HAMSpatialAttention(nn.Module):
    """Channel separation plus the shared-conv spatial maps of HAM Eqs. 8-10."""

    def __init__(self, channels: int, separation_rate: float = 0.6, kernel_size: int = 7) -> None:
        super().__init__()
        if not 0.0 < separation_rate < 1.0:
            raise ValueError(f"separation_rate must be in (0, 1), got {separation_rate!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        c_im = important_channel_count(channels, separation_rate)
        if not 0 < c_im < channels:
            raise ValueError(
                f"separation_rate={separation_rate} with {channels} channels gives "
                f"C_im={c_im}, which leaves a group empty; HAM's spatial attention needs "
                f"0 < C_im < C (use more channels, another separation_rate, or spatial=None)"
            )
        self.important = c_im
        self.subimportant = channels - c_im
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def important_mask(self, channel_weights: torch.Tensor) -> torch.Tensor:
        """1 for each sample's top-C_im channels, else 0; shape (N, C, 1, 1)."""
        flat = channel_weights.flatten(1)
        # A stable descending sort breaks ties by the lowest channel index, on every device.
        if exporting():  # ONNX has no stable sort; its TopK also puts lower indices first
            top = flat.topk(self.important, dim=1).indices
        else:
            top = flat.sort(dim=1, descending=True, stable=True).indices[:, : self.important]
        mask = torch.zeros_like(flat).scatter_(1, top, 1.0)
        return mask.view_as(channel_weights)

    def maps(self, refined: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A_S,1 and A_S,2, each (N, 1, H, W)."""
        group1 = refined * mask
        group2 = refined - group1
        total = refined.sum(dim=1, keepdim=True)
        sum1 = group1.sum(dim=1, keepdim=True)
        desc = torch.cat(
            [
                torch.cat([sum1 / self.important, channel_max(group1)], dim=1),
                torch.cat([(total - sum1) / self.subimportant, channel_max(group2)], dim=1),
            ],
            dim=0,
        )  # (2N, 2, H, W): both groups in one batch through the shared conv and BN
        a = torch.sigmoid(torch.relu(self.bn(self.conv(conv_input(desc)))))
        n = refined.shape[0]
        return a[:n], a[n:]

    def logits(self, descriptors: torch.Tensor) -> torch.Tensor:
        """relu(BN(conv(desc))) for the (2N, 2, H, W) stack of both groups' [avg; max]."""
        return torch.relu(self.bn(gate_conv2d(descriptors, self.conv)))

    def forward(self, refined: torch.Tensor, channel_weights: torch.Tensor) -> torch.Tensor:
        if kernel_ready(refined):
            return _kernel_separated_gate(self, refined, channel_weights)
        if use_fused(refined, *self.parameters()):
            flat = channel_weights.flatten(1)
            order = flat.sort(dim=1, descending=True, stable=True).indices
            return _SeparatedSpatialGate.apply(refined, order, self, *self.parameters())
        mask = self.important_mask(channel_weights).to(refined.dtype)
        a1, a2 = self.maps(refined, mask)
        # F''_1 + F''_2 = a1 * mask * F' + a2 * (1 - mask) * F'
        return refined * torch.where(mask.bool(), a1, a2)


def _group_sums(t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """sum_c t[:, c] * groups[:, c, g] for g = 0, 1: (N, 2, H, W), one read of t."""
    n, c, h, w = t.shape
    groups = groups.to(t.dtype)
    with autocast_off(t.device.type):  # sums in t's precision, as .sum()
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            rows = t.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view
            return torch.bmm(rows, groups).view(n, h, w, 2).permute(0, 3, 1, 2)
        return torch.bmm(groups.transpose(1, 2), t.reshape(n, c, h * w)).view(n, 2, h, w)


class _SeparatedSpatialGate(torch.autograd.Function):
    """F'' = F' * where(mask, A_S,1, A_S,2) (HAM Eqs. 2-4, 9-10) as one autograd node."""

    @staticmethod
    def forward(ctx, refined, order, module, *params):  # noqa: ANN001, ANN205
        n, c, h, w = refined.shape
        c_im = module.important
        if not (
            refined.is_contiguous() or refined.is_contiguous(memory_format=torch.channels_last)
        ):
            refined = refined.contiguous()
        mask = torch.zeros(n, c, dtype=torch.bool, device=refined.device)
        mask.scatter_(1, order[:, :c_im], True)
        groups = torch.stack([mask, ~mask], dim=2).to(refined.dtype)  # (N, C, 2)
        ordered = refined.gather(1, order.view(n, c, 1, 1).expand(n, c, h, w))
        leaves, channels, positive = [], [], []
        sums = _group_sums(refined, groups)
        for g, (part, start, count) in enumerate(
            ((ordered[:, :c_im], 0, c_im), (ordered[:, c_im:], c_im, c - c_im))
        ):
            top, where = part.max(dim=1, keepdim=True)
            # The masked group has count < C channels and zeros elsewhere: its max is >= 0.
            positive.append(top > 0)
            channels.append(order.gather(1, (where + start).view(n, -1)).view(n, 1, h, w))
            leaves.append(sums[:, g : g + 1] / count)
            leaves.append(top.clamp_min(0))
        for leaf in leaves:
            leaf.requires_grad_()
        with torch.enable_grad():
            desc = torch.cat(
                [torch.cat(leaves[:2], dim=1), torch.cat(leaves[2:], dim=1)], dim=0
            )  # (2N, 2, H, W): both groups in one batch through the shared conv and BN
            logits = module.logits(desc)
        maps = torch.sigmoid(logits.detach()).to(refined.dtype)
        # where(mask, A_S,1, A_S,2) as A_S,2 + mask * (A_S,1 - A_S,2): one broadcast pass
        # (``where`` with these broadcast shapes is several times slower here).
        weight = torch.empty_like(refined)
        important = groups[:, :, :1].view(n, c, 1, 1)
        torch.addcmul(maps[n:], important, maps[:n] - maps[n:], out=weight)
        ctx.module, ctx.params = module, params
        ctx.graph = (leaves, logits, channels, positive)
        ctx.save_for_backward(refined, weight, maps, groups)
        return refined * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        refined, weight, maps, groups = ctx.saved_tensors
        leaves, logits, channels, positive = ctx.graph
        n, c = refined.shape[:2]
        c_im = ctx.module.important
        params = [p for p in ctx.params if p.requires_grad]
        # grad * F' goes into the buffer that then receives the gradient (one allocation).
        grad = torch.empty_like(refined)
        if grad_out.dtype == refined.dtype:
            grad_maps = _group_sums(torch.mul(grad_out, refined, out=grad), groups)
        else:
            grad_maps = _group_sums(grad_out * refined, groups)  # d/d A_S,1 and A_S,2
        grad_logits = torch.cat([grad_maps[:, :1], grad_maps[:, 1:]], dim=0)
        grad_logits = (grad_logits * maps * (1 - maps)).to(logits.dtype)
        # retain_graph: the small inner graph lives as long as this node (retain_graph on the
        # outer backward may call this again); it is freed with the node.
        grads = torch.autograd.grad(
            logits, leaves + params, grad_logits, allow_unused=True, retain_graph=True
        )
        zeros = torch.zeros_like(leaves[0])
        g_avg1, g_max1, g_avg2, g_max2 = (zeros if g is None else g for g in grads[:4])
        important = groups[:, :, :1].view(n, c, 1, 1)
        mean1, mean2 = (g_avg1 / c_im).to(grad.dtype), (g_avg2 / (c - c_im)).to(grad.dtype)
        torch.addcmul(mean2, important, mean1 - mean2, out=grad)  # where(mask, mean1, mean2)
        grad.addcmul_(grad_out, weight)
        for channel, g_max, keep in zip(channels, (g_max1, g_max2), positive, strict=True):
            grad.scatter_add_(1, channel, (g_max * keep).to(grad.dtype))
        by_param = dict(zip(map(id, params), grads[4:], strict=True))
        return (grad, None, None, *(by_param.get(id(p)) for p in ctx.params))


def _separation_groups(order: torch.Tensor, important: int) -> torch.Tensor:
    """int8 (N, C): 0 for each sample's top-C_im channels (``order`` sorts them by weight,
    descending, stable), 1 for the rest."""
    groups = torch.zeros(order.shape, dtype=torch.int8, device=order.device)
    return groups.scatter_(1, order[:, important:], 1)


def _kernel_descriptors(module, refined, x3, groups, fmt):  # noqa: ANN001, ANN202
    """The four (N, 1, H, W) maps [avg_1, max_1, avg_2, max_2] (Eq. 9) from one ``pool``
    pass, whether each group max is positive, and the argmax channels."""
    total, top, arg = kernels.pool(x3, groups, 2, True)
    counts = (module.important, module.subimportant)
    leaves, positive = [], []
    for g in range(2):
        mean = views.pooled(total[:, g] / counts[g], refined.shape, fmt, (1,))
        best = views.pooled(top[:, g], refined.shape, fmt, (1,))
        # The group map has zeros at the other group's channels: its max is >= 0.
        positive.append(best > 0)
        leaves += [mean.to(refined.dtype), best.clamp_min(0).to(refined.dtype)]
    return leaves, positive, arg


def _stack_gates(maps: torch.Tensor, n: int, fmt: str, shape: torch.Size) -> torch.Tensor:
    """(2N, 1, H, W) [A_S,1; A_S,2] -> the kernels' (O, 2, I) float32 gate."""
    return torch.cat(
        [views.to_oi(maps[:n], fmt, (1,), shape), views.to_oi(maps[n:], fmt, (1,), shape)], 1
    )


def _kernel_separated_gate(module, refined, channel_weights):  # noqa: ANN001, ANN202
    """F'' through the fused kernels: the autograd node when grad is recorded, else the
    forward passes alone (inference)."""
    refined, fmt = gate_layout(refined)
    order = channel_weights.flatten(1).sort(dim=1, descending=True, stable=True).indices
    params = tuple(module.parameters())
    if torch.is_grad_enabled() and (refined.requires_grad or any(p.requires_grad for p in params)):
        return _KernelSeparatedGate.apply(refined, order, module, fmt, *params)
    groups = _separation_groups(order, module.important)
    x3 = views.as_ori(refined, fmt, (1,))
    leaves, _, _ = _kernel_descriptors(module, refined, x3, groups, fmt)
    desc = torch.cat([torch.cat(leaves[:2], dim=1), torch.cat(leaves[2:], dim=1)], dim=0)
    maps = torch.sigmoid(module.logits(desc))
    gate = _stack_gates(maps, refined.shape[0], fmt, refined.shape)
    out = torch.empty_like(refined)
    kernels.apply(x3, gate, groups, 2, out=views.as_ori(out, fmt, (1,)))
    return out


class _KernelSeparatedGate(torch.autograd.Function):
    """F'' = F' * where(mask, A_S,1, A_S,2) on the kernels (``attnzoo.kernels``): one grouped
    ``pool`` pass and one ``apply`` pass forward; one grouped ``dot`` pass and one
    ``backward`` pass back (see ``_SeparatedSpatialGate`` for the same node in PyTorch ops).
    A tie for a group's max sends the gradient to the lowest channel index."""

    @staticmethod
    def forward(ctx, refined, order, module, fmt, *params):  # noqa: ANN001, ANN205
        n = refined.shape[0]
        groups = _separation_groups(order, module.important)
        x3 = views.as_ori(refined, fmt, (1,))
        leaves, positive, arg = _kernel_descriptors(module, refined, x3, groups, fmt)
        for leaf in leaves:
            leaf.requires_grad_()
        with torch.enable_grad():
            desc = torch.cat([torch.cat(leaves[:2], dim=1), torch.cat(leaves[2:], dim=1)], dim=0)
            logits = module.logits(desc)
        gate = _stack_gates(torch.sigmoid(logits.detach()), n, fmt, refined.shape)
        ctx.module, ctx.params, ctx.fmt = module, params, fmt
        ctx.graph = (leaves, logits, positive)
        ctx.save_for_backward(refined, gate, groups, arg)
        out = torch.empty_like(refined)  # not a view: callers may add to it in place (timm)
        kernels.apply(x3, gate, groups, 2, out=views.as_ori(out, fmt, (1,)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        refined, gate, groups, arg = ctx.saved_tensors
        leaves, logits, positive = ctx.graph
        fmt, module, shape = ctx.fmt, ctx.module, refined.shape
        memory = torch.channels_last if fmt == "nhwc" else torch.contiguous_format
        grad_out = grad_out.to(refined.dtype)
        if not grad_out.is_contiguous(memory_format=memory):
            grad_out = grad_out.contiguous(memory_format=memory)
        x3, g3 = views.as_ori(refined, fmt, (1,)), views.as_ori(grad_out, fmt, (1,))
        grad_gate = kernels.dot(g3, x3, groups, 2)  # d/d A_S,1 and A_S,2, (O, 2, I)
        maps = torch.cat([views.pooled(gate[:, g], shape, fmt, (1,)) for g in range(2)], 0)
        grad_maps = torch.cat([views.pooled(grad_gate[:, g], shape, fmt, (1,)) for g in range(2)])
        grad_logits = (grad_maps * maps * (1 - maps)).to(logits.dtype)
        params = [p for p in ctx.params if p.requires_grad]
        grads = torch.autograd.grad(
            logits, leaves + params, grad_logits, allow_unused=True, retain_graph=True
        )
        zeros = torch.zeros_like(leaves[0])
        g_avg1, g_max1, g_avg2, g_max2 = (zeros if g is None else g for g in grads[:4])
        bias = torch.cat(
            [
                views.to_oi(g_avg1 / module.important, fmt, (1,), shape),
                views.to_oi(g_avg2 / module.subimportant, fmt, (1,), shape),
            ],
            1,
        )
        dmax = torch.cat(
            [
                views.to_oi(g_max1 * positive[0], fmt, (1,), shape),
                views.to_oi(g_max2 * positive[1], fmt, (1,), shape),
            ],
            1,
        )
        grad = torch.empty_like(refined)
        kernels.backward(g3, gate, groups, 2, bias, arg, dmax, out=views.as_ori(grad, fmt, (1,)))
        by_param = dict(zip(map(id, params), grads[4:], strict=True))
        return (
            grad,
            None,
            None,
            None,
            *(by_param.get(id(p)) for p in ctx.params),
        )


@register_attention("ham")
class HAM(nn.Module):
    def __init__(
        self,
        channels: int,
        separation_rate: float = 0.6,
        kernel_size: int = 7,
        adaptive: bool = True,
        spatial: str | None = "ham",
        eca_kernel: int | None = None,
    ) -> None:
        super().__init__()
        if spatial not in SPATIAL_CHOICES:
            raise ValueError(f"spatial must be one of 'ham', 'cbam', None; got {spatial!r}")
        if not 0.0 < separation_rate < 1.0:
            raise ValueError(f"separation_rate must be in (0, 1), got {separation_rate!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.channels = channels
        self.channel = HAMChannelAttention(channels, adaptive, eca_kernel)
        self.spatial_kind = spatial
        if spatial == "ham":
            self.spatial = HAMSpatialAttention(channels, separation_rate, kernel_size)
        elif spatial == "cbam":
            self.spatial = SpatialGate(kernel_size)
        else:
            self.spatial = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, "ham")
        refined, weights = self.channel.refine(x)
        if self.spatial_kind == "ham":
            return self.spatial(refined, weights)
        if self.spatial_kind == "cbam":
            return self.spatial(refined)
        return refined
