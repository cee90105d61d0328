"""What the attention modules of a trained model compute: spatial maps and channel weights,
read with forward hooks during one forward pass.

The attention modules are found with ``model.modules()``: instances of the registered
module- and block-level attention classes that do not sit inside another one (CSM's inner
SE gate belongs to CSM). Of those, the last module of each stage is read (a stage's own
blocks, a ``"stage"`` boundary module, or the ``"final"`` one), at most four per run (the
deepest): three for a CIFAR ResNet, four for ResNet-50, the last four of MobileNetV2's five. Each hook recomputes its module's maps from the module's own
input with the module's own methods, so what is shown is what the module multiplies by.

What is read, per module:

| module | spatial maps (N, h, w) | channel weights (N, C) |
| --- | --- | --- |
| ``cbam`` | M_s, the spatial gate on the channel-refined F' | M_c |
| ``ham`` | A_S,1 and A_S,2, the maps of the important and sub-important groups (``spatial="cbam"``: M_s) | A_C |
| ``gam`` | M_s averaged over channels (GAM's spatial gate is C x H x W) | - (per pixel) |
| ``csm``, ``danet_pam`` | position attention received: mean over query positions of softmax(B^T C) | ``csm``: the SE gate |
| ``bam`` | M_s, the spatial branch before the sigmoid | - |
| ``triplet`` | the H-W branch's gate | - |
| ``spatial_softmax`` | the softmax weights a (scaled to mean 1 by default) | - |
| ``se``, ``eca``, ``bridge`` | - | the gate |
| ``abn`` (model-level) | M, from ``forward_maps`` | - |

Other modules (``danet_cam``, ``rcca``) have no map of either kind and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.abn import AttentionBranchNetwork
from ..attention.bam import BAM
from ..attention.bridge import BridgeAttention
from ..attention.cbam import CBAM
from ..attention.csm import CSM
from ..attention.danet import PositionAttention
from ..attention.eca import EfficientChannelAttention
from ..attention.gam import GAM
from ..attention.ham import HAM
from ..attention.se import SqueezeExcite
from ..attention.spatial_softmax import SpatialSoftmaxAttention
from ..attention.triplet import TripletAttention
from ..registry import attention_class, list_attentions
from .gradcam import backbone_of


@dataclass
class SpatialMap:
    module: str  # qualified module name, e.g. "layer3.2.attention"
    stage: str  # e.g. "layer3", "after layer1", "final"
    name: str  # which map of the module, e.g. "A_S,1 (important)"
    values: torch.Tensor  # (N, h, w) at the module's resolution


@dataclass
class ChannelWeights:
    module: str
    stage: str
    name: str
    values: torch.Tensor  # (N, C)


@dataclass
class AttentionReadout:
    spatial: list[SpatialMap] = field(default_factory=list)
    channel: list[ChannelWeights] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (N, classes) of the same forward pass


MAX_MODULES = 4  # modules read per run, so that a grid stays readable

# (module, forward args) -> ([(map name, (N, 1 or -, h, w) tensor)], channel weights or None)
Reading = tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]


def received_attention(pam: PositionAttention, x: torch.Tensor) -> torch.Tensor:
    """Mean over query positions of S = softmax(B^T C) (key axis): (N, h, w).

    One image at a time: S is (HW x HW), 4 MB per image on a 32x32 map.
    """
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        q = pam.query(x[i : i + 1]).flatten(2)[0]  # (C', HW)
        k = pam.key(x[i : i + 1]).flatten(2)[0]
        s = torch.softmax(q.t() @ k, dim=-1)  # rows: query positions, softmax over keys
        out.append(s.mean(dim=0).view(h, w))
    return torch.stack(out)


def _pam_name(pam: PositionAttention) -> str:
    return f"attention received (gamma {float(pam.gamma):.2g})"


def _cbam(m: CBAM, args: tuple) -> Reading:
    x = args[0]
    gate = m.channel_gate(x)
    maps = [] if m.spatial is None else [("M_s", m.spatial.attention_map(x * gate))]
    return maps, gate.flatten(1)


def _ham(m: HAM, args: tuple) -> Reading:
    x = args[0]
    weights = m.channel(x)
    refined = x * weights
    if m.spatial_kind == "ham":
        mask = m.spatial.important_mask(weights).to(x.dtype)
        a1, a2 = m.spatial.maps(refined, mask)
        maps = [("A_S,1 (important)", a1), ("A_S,2 (sub-important)", a2)]
    elif m.spatial_kind == "cbam":
        maps = [("M_s", m.spatial.attention_map(refined))]
    else:
        maps = []
    return maps, weights.flatten(1)


def _gam(m: GAM, args: tuple) -> Reading:
    x = args[0]
    if m.channel_fc1 is not None:
        x = m.channel_attention(x) * x
    if not m.use_spatial:
        return [], None
    return [("M_s, mean over channels", m.spatial_attention(x).mean(dim=1))], None


def _csm(m: CSM, args: tuple) -> Reading:
    x = args[0]
    steps = [m.channel, m.spatial]
    if m.order == "spatial_first":
        steps.reverse()
    maps, channel = [], None
    for step in steps:
        if step is None:
            continue
        if step is m.channel:
            channel = step.gate(x).flatten(1)
        else:
            maps.append((_pam_name(step), received_attention(step, x)))
        x = step(x)
    return maps, channel


def _pam(m: PositionAttention, args: tuple) -> Reading:
    return [(_pam_name(m), received_attention(m, args[0]))], None


def _bam(m: BAM, args: tuple) -> Reading:
    return [("M_s (logits)", m.spatial_attention(args[0]))], None


def _triplet(m: TripletAttention, args: tuple) -> Reading:
    if m.height_width is None:
        return [], None
    return [("H-W gate", m.height_width.gate(args[0]))], None


def _spatial_softmax(m: SpatialSoftmaxAttention, args: tuple) -> Reading:
    return [("softmax weights", m.attention_map(args[0]))], None


def _gate(m: nn.Module, args: tuple) -> Reading:
    return [], m.gate(args[0]).flatten(1)


def _bridge(m: BridgeAttention, args: tuple) -> Reading:
    return [], m.gate(args[0], args[1] if len(args) > 1 else ()).flatten(1)


READERS: dict[type, Callable[[nn.Module, tuple], Reading]] = {
    CBAM: _cbam,
    HAM: _ham,
    GAM: _gam,
    CSM: _csm,
    PositionAttention: _pam,
    BAM: _bam,
    TripletAttention: _triplet,
    SpatialSoftmaxAttention: _spatial_softmax,
    SqueezeExcite: _gate,
    EfficientChannelAttention: _gate,
    BridgeAttention: _bridge,
}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every outermost module- or block-level attention module, in ``named_modules`` order."""
    classes = tuple(
        c
        for c in (attention_class(n) for n in list_attentions(level=("module", "block")))
        if isinstance(c, type)
    )
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, classes):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # part of a module already found (CSM's SE gate)
        found.append((name, module))
    return found


def stage_of(model: nn.Module) -> Callable[[nn.Module, str], str]:
    """module, name -> the stage it belongs to ("layer2", "after layer1", "final", "")."""
    net = backbone_of(model)
    names = list(getattr(net, "stage_names", ()))
    owner = {id(m): s for s in names for m in getattr(net, s).modules()}

    def stage(module: nn.Module, name: str) -> str:
        if id(module) in owner:
            return owner[id(module)]
        parts = name.split(".")
        if "stage_attention" in parts:
            index = int(parts[parts.index("stage_attention") + 1])
            return f"after {names[index]}" if index < len(names) else "stage attention"
        if "final_attention" in parts:
            return "final"
        return ""

    return stage


def last_per_stage(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, stage, module) of the last readable attention module of each stage, for the
    deepest ``MAX_MODULES`` stages (MobileNetV2 has five)."""
    stage = stage_of(model)
    last: dict[str, tuple[str, nn.Module]] = {}
    for name, module in attention_modules(model):
        if type(module) in READERS:
            last[stage(module, name)] = (name, module)  # dicts keep the first insertion order
    return [(name, s, module) for s, (name, module) in last.items()][-MAX_MODULES:]


@torch.no_grad()
def read_attention(model: nn.Module, images: torch.Tensor) -> AttentionReadout:
    """Spatial maps and channel weights of the last attention module per stage, from one
    eval-mode forward pass over normalised ``images`` (N, C, H, W)."""
    model.eval()
    readout = AttentionReadout()
    handles = []

    def hook_for(name: str, stage: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            maps, channel = READERS[type(module)](module, args)
            for label, values in maps:
                # On the CPU whatever the model's device: the figures read them.
                values = values.reshape(values.shape[0], *values.shape[-2:]).float().cpu()
                readout.spatial.append(SpatialMap(name, stage, label, values))
            if channel is not None:
                channel = channel.float().cpu()
                readout.channel.append(ChannelWeights(name, stage, "channel weights", channel))

        return hook

    try:
        for name, stage, module in last_per_stage(model):
            handles.append(module.register_forward_hook(hook_for(name, stage)))
        if isinstance(model, AttentionBranchNetwork):
            out = model.forward_maps(images)
            net = model.backbone
            where = f"after {net.stage_names[model.split - 1]}"
            m = out["attention_map"][:, 0].float().cpu()
            readout.spatial.append(SpatialMap("attention branch", where, "M", m))
            readout.logits = out["logits"].cpu()
        else:
            readout.logits = model(images).cpu()
    finally:
        for handle in handles:
            handle.remove()
    return readout


def upsample(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W), bilinear, as the images are shown."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    return F.interpolate(values[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
