"""timm's SE, ECA and CBAM layers in our backbones, with our weights, for side-by-side timing.

``attnzoo bench --model resnet56 --attentions none se eca cbam --timm`` times each of these
modules twice in the same round-robin: ours, and timm's layer with the same structure and
the same weights (``timm`` must be installed: ``pip install timm``, part of the ``dev``
extras).

How timm's layer gets into our backbone: the model is built with *our* module through the
registry and its ``placement`` as usual, then every instance of our module class is
replaced by the timm layer configured to the same structure, with our module's weights
copied under timm's parameter names. Both networks therefore start from identical weights,
and before any timing ``swap_in_timm`` checks, per replaced module, that the two give the
same output on a random input (train and eval mode), and that the whole networks do.

Structural mapping (read from timm 1.0's ``timm/layers/{squeeze_excite,eca,cbam}.py``):

| ours | timm | options that make them equal |
| --- | --- | --- |
| ``se`` (``fc1``, ``fc2``, both with bias) | ``SEModule`` (``fc1``, ``fc2``) | ``rd_channels`` = our hidden width (timm's default rounds C/16 to a multiple of 8); ``bias=True``, no norm |
| ``eca`` (``conv``, no bias) | ``EcaModule`` (``conv``) | ``channels=None, kernel_size=k``: given ``channels`` timm recomputes k and never goes below 3 |
| ``cbam`` (``mlp.0``, ``mlp.2`` with bias; ``spatial.conv`` no bias + ``spatial.bn``) | ``CbamModule`` (``channel.fc1/fc2``; ``spatial.conv.conv`` + ``spatial.conv.bn``) | ``rd_channels`` = our hidden width, ``mlp_bias=True`` (timm's default has no MLP bias), ``spatial_kernel_size`` = ours; timm's spatial conv is also conv (no bias) + BN, descriptors in the same [mean; max] order |
| ``cbam`` with ``spatial=False`` | ``ChannelAttn`` | as the channel half above |

Not matched: CBAM's ``adaptive=True`` (HAM's pooling mix) and ``max_pool=False`` have no
timm counterpart; asking for them raises ``ValueError``. The remaining differences are in
how the same function is computed, which is what the timing compares: timm reduces with
``amax`` (ours: ``adaptive_max_pool2d`` / ``max``, cheaper backward), runs CBAM's MLP twice
(ours: once on the two descriptors stacked), and feeds the 7x7 conv whatever layout the
concatenation gives (ours: channels_last).

Devices: ``bench --timm --device cuda`` builds and checks the swapped network on the CPU,
in fp32, then moves it to the GPU and times it with ours in the same round-robin and the
same CUDA-event timing (``bench.py``). The check stays on the CPU because on CUDA cuDNN's
convolutions may run in TF32 (``torch.backends.cudnn.allow_tf32``, on by default), whose
rounding would swamp a 1e-5 comparison; the layers compute the same function on either
device. ``compare`` and ``swap_in_timm`` also accept modules already on a GPU (inputs and
output gradients follow the module's device), under that caveat.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .. import kernels
from ..attention.cbam import CBAM
from ..attention.eca import EfficientChannelAttention
from ..attention.se import SqueezeExcite
from ..registry import create_attention

# Our attention name -> our class; the ones ``timm_equivalent`` can convert.
TIMM_ATTENTIONS: dict[str, type[nn.Module]] = {
    "se": SqueezeExcite,
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
}
TOLERANCE = 1e-5  # outputs
# Gradients: sums over many positions, summed in other orders, so their rounding grows with
# their size: a difference is taken absolute, or relative to the largest gradient of that
# tensor where that exceeds 1.
GRAD_TOLERANCE = 1e-4
# The whole network's gradients, a looser check than each module's: through 56 layers,
# float32 rounding can move a pre-activation across a ReLU's 0 and re-route a gradient. On
# the bench's resnet56 + CBAM in eval mode, ours and timm's parameter gradients differ by
# 1.8e-4 in float32 and by 1e-15 in float64 (the same functions, rounded differently).
NETWORK_GRAD_TOLERANCE = 1e-3


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def require_timm() -> None:
    if not timm_available():
        raise ValueError("comparing with timm needs the timm package: pip install timm")


def _se(ours: SqueezeExcite) -> tuple[nn.Module, dict[str, str]]:
    from timm.layers import SEModule

    theirs = SEModule(ours.channels, rd_channels=ours.fc1.out_channels, bias=True)
    return theirs, {k: k for k in ours.state_dict()}


def _eca(ours: EfficientChannelAttention) -> tuple[nn.Module, dict[str, str]]:
    from timm.layers import EcaModule

    # With ``channels`` given, timm derives k itself (and at least 3): pass k alone.
    return EcaModule(None, kernel_size=ours.kernel_size), {"conv.weight": "conv.weight"}


def _cbam(ours: CBAM) -> tuple[nn.Module, dict[str, str]]:
    from timm.layers.cbam import CbamModule, ChannelAttn

    if ours.mix is not None or not ours.max_pool:
        raise ValueError(
            "timm's CBAM has no counterpart of adaptive=True or max_pool=False; "
            "compare the default CBAM (or spatial=False)"
        )
    hidden = ours.mlp[0].out_channels
    names = {
        "mlp.0.weight": "fc1.weight",
        "mlp.0.bias": "fc1.bias",
        "mlp.2.weight": "fc2.weight",
        "mlp.2.bias": "fc2.bias",
    }
    if ours.spatial is None:
        return ChannelAttn(ours.channels, rd_channels=hidden, mlp_bias=True), names
    theirs = CbamModule(
        ours.channels,
        rd_channels=hidden,
        mlp_bias=True,
        spatial_kernel_size=ours.spatial.conv.kernel_size[0],
    )
    names = {k: "channel." + v for k, v in names.items()}
    for key in ours.state_dict():
        if key.startswith("spatial.conv."):
            names[key] = "spatial.conv.conv." + key.removeprefix("spatial.conv.")
        elif key.startswith("spatial.bn."):
            names[key] = "spatial.conv.bn." + key.removeprefix("spatial.bn.")
    return theirs, names


_CONVERTERS: dict[type[nn.Module], Callable[..., tuple[nn.Module, dict[str, str]]]] = {
    SqueezeExcite: _se,
    EfficientChannelAttention: _eca,
    CBAM: _cbam,
}


def _convert(ours: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    require_timm()
    convert = _CONVERTERS.get(type(ours))
    if convert is None:
        raise ValueError(
            f"no timm counterpart for {type(ours).__name__}; "
            f"timm comparison covers: {', '.join(TIMM_ATTENTIONS)}"
        )
    theirs, names = convert(ours)
    state = ours.state_dict()
    if set(names) != set(state):
        raise RuntimeError(f"parameter map misses {sorted(set(state) - set(names))}")
    theirs.load_state_dict({names[k]: v.clone() for k, v in state.items()}, strict=True)
    theirs.train(ours.training)
    return theirs, names


def timm_equivalent(ours: nn.Module) -> nn.Module:
    """timm's layer with the structure and a copy of the weights of ``ours`` (se/eca/cbam)."""
    return _convert(ours)[0]


def compare(
    ours: nn.Module, theirs: nn.Module, x: torch.Tensor, names: dict[str, str] | None = None
) -> dict[str, float]:
    """Largest differences between ``ours`` and ``theirs`` on ``x``, in train and in eval
    mode (on copies, so that BN running statistics stay as they are): of the outputs, of the
    gradients with respect to the input and of the parameter gradients (``names`` maps our
    parameter names to theirs; without it, parameters of the same name are compared).

    Gradients are taken for a fixed random output gradient; both forward passes run with
    autograd recording, i.e. through our fused gate node, not its no-grad fallback. A
    gradient's difference is divided by its largest magnitude where that exceeds 1
    (``scaled_diff``): float rounding grows with the values."""
    worst = {"output": 0.0, "input_grad": 0.0, "param_grad": 0.0}
    grad_out = None
    for train in (True, False):
        a, b = copy.deepcopy(ours).train(train), copy.deepcopy(theirs).train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        if grad_out is None:
            gen = torch.Generator().manual_seed(7)
            grad_out = torch.randn(ya.shape, generator=gen).to(ya.device)
        ya.backward(grad_out)
        yb.backward(grad_out)
        diffs = {
            "output": (ya - yb).abs().max().item(),
            "input_grad": scaled_diff(xa.grad, xb.grad),
        }
        theirs_params = dict(b.named_parameters())
        param_diffs = [0.0]
        for name, p in a.named_parameters():
            q = theirs_params.get(names[name] if names else name)
            if q is not None and p.grad is not None and q.grad is not None:
                param_diffs.append(scaled_diff(p.grad, q.grad))
        diffs["param_grad"] = max(param_diffs)
        worst = {k: max(worst[k], diffs[k]) for k in worst}
    return worst


def scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, divided by max |b| where that exceeds 1."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def max_abs_diff(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> float:
    """Largest |ours(x) - theirs(x)| in train mode and in eval mode (autograd recording)."""
    return compare(ours, theirs, x)["output"]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BN statistics, so that an equality check is not helped by
    zero or identity initialisations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def check_module(
    attention: str, channels: int, attention_kwargs: dict | None = None, seed: int = 0
) -> dict[str, float]:
    """Build our ``attention`` for ``channels`` with random weights and its timm counterpart
    with the same weights; return ``compare``'s differences on a random input."""
    ours = randomize_(create_attention(attention, channels, **(attention_kwargs or {})), seed)
    theirs, names = _convert(ours)
    x = torch.randn(4, channels, 9, 7, generator=torch.Generator().manual_seed(seed + 1))
    return compare(ours, theirs, x, names)


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


def swap_in_timm(
    model: nn.Module, attention: str, input_size: int = 32, check: bool = True
) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with every ``attention`` module replaced by timm's, same weights.

    With ``check``, raises ``RuntimeError`` unless every replaced module (with randomised
    weights) and the whole network give the same outputs as ours to within ``TOLERANCE``
    on random inputs, and the same gradients to within ``GRAD_TOLERANCE`` (each module) and
    ``NETWORK_GRAD_TOLERANCE`` (the network). Returns ``{"modules": n, "output_max_abs_diff":
    d, "grad_max_abs_diff": g, "network_grad_max_diff": G}`` (d the largest over the modules
    and the network, g over the modules).
    """
    require_timm()
    cls = TIMM_ATTENTIONS.get(attention)
    if cls is None:
        raise ValueError(
            f"no timm counterpart for {attention!r}; choose from: {', '.join(TIMM_ATTENTIONS)}"
        )
    swapped = copy.deepcopy(model)
    replaced = []
    for parent in list(swapped.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is cls:
                setattr(parent, name, timm_equivalent(child).to(_device_of(child)))
                replaced.append(child)
    if not replaced:
        raise ValueError(f"the model has no {attention!r} module to replace")
    report = {"modules": len(replaced), "output_max_abs_diff": 0.0, "grad_max_abs_diff": 0.0}
    if not check:
        return swapped, report
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for ours in replaced:
        # The network's own weights (attention gates often start at zero or identity) could
        # hide differences: compare a randomised copy of ours with its timm conversion.
        rand = randomize_(copy.deepcopy(ours))
        theirs, names = _convert(rand)
        x = torch.randn(4, ours.channels, 9, 7, generator=gen).to(_device_of(ours))
        diffs.append(compare(rand, theirs.to(_device_of(ours)), x, names))
    chans = getattr(model, "in_chans", 3)
    x = torch.randn(4, chans, input_size, input_size, generator=gen).to(_device_of(model))
    # The network on the PyTorch gate path: its float32 rounding then differs from timm's only
    # where the layers do. On the fused kernels (attnzoo.kernels), whose sums are ordered
    # differently, the network's input gradient moves by up to 1.8e-3 (resnet56 + SE,
    # kernels on against off, both ours) -- rounding carried through 56 layers and their
    # ReLUs, which the tolerance would have to absorb. The modules above are compared on the
    # kernels; the kernels themselves are tested against float64 (tests/kernels/).
    with kernels.kernels("off"):
        network = compare(model, swapped, x)
    report["output_max_abs_diff"] = max(d["output"] for d in [*diffs, network])
    report["grad_max_abs_diff"] = max(max(d["input_grad"], d["param_grad"]) for d in diffs)
    report["network_grad_max_diff"] = max(network["input_grad"], network["param_grad"])
    if not (
        report["output_max_abs_diff"] < TOLERANCE
        and report["grad_max_abs_diff"] < GRAD_TOLERANCE
        and report["network_grad_max_diff"] < NETWORK_GRAD_TOLERANCE
    ):
        raise RuntimeError(
            f"timm's {attention} differs from ours: outputs by {report['output_max_abs_diff']:.3g} "
            f"(tolerance {TOLERANCE}), module gradients by {report['grad_max_abs_diff']:.3g} "
            f"(tolerance {GRAD_TOLERANCE}), network gradients by "
            f"{report['network_grad_max_diff']:.3g} (tolerance {NETWORK_GRAD_TOLERANCE})"
        )
    return swapped, report
