"""Graft attention modules into an existing network: a torchvision or timm ResNet, ResNeXt or
Wide ResNet, a torchvision MobileNetV2, or any model built from blocks it recognises.

    model = torchvision.models.resnet50(weights=...)
    attnzoo.graft(model, "cbam", attention_init="identity")  # in place; returns model
    model.graft_report  # [GraftSite(name='layer1.0.bn3.attention', channels=256, ...), ...]

Placement, as in attnzoo's own backbones (``models/backbone.py``; default per attention:
``registry.default_placement``, every block for most, the stage boundaries for bam, a2 and
nonlocal):

- ``"block"``: in every recognised block, on the output of the BN that ends its residual
  branch, before the addition with the shortcut (``bn2`` of a BasicBlock, ``bn3`` of a
  Bottleneck, the projection BN ``conv[-1]`` of an InvertedResidual, also where it has no
  addition). That BN is replaced by a ``BatchNormAttention`` (``FrozenBatchNormAttention``
  for the FrozenBatchNorm2d of torchvision's detection backbones): a ``BatchNorm2d`` holding the
  *same* parameter and buffer objects under the same keys, followed by its child
  ``attention`` (keys ``layer1.0.bn3.attention.*``). In a timm block it runs before the
  block's own ``se`` if it has one.
- ``"stage"``: after every stage but the last, i.e. after each block that the next block
  downsamples from (a strided conv or pooling in it): three in a ResNet (after layer1 ...
  layer3), four in MobileNetV2 (after features.1, .3, .6, .13, as attnzoo's mobilenet_v2).
- ``"final"``: once on the last feature map, after the last child of the container that
  holds the last block (ResNet: after layer4; MobileNetV2: after features.18, the 1280-channel
  conv).

A stage or final module is inserted into the ``nn.Sequential`` that holds the block: as
``attention`` when it comes last there (``layer1.attention``, ``features.attention``),
otherwise as ``<block>_attention`` right after the block (``features.1_attention``); integer
indexing of that Sequential then counts the new module too (``features[2]`` is
``features.1_attention``).

No existing module is renamed, so the original state_dict loads into the grafted model
with ``strict=False`` and the only missing keys are the attention modules' (``strict=True``
after grafting fails on exactly those). ``attention_init="identity"`` makes the grafted
model compute what the original computes (``attention/identity_init.py``): use it on
pretrained weights.

What it cannot graft, with an error that says so: block-level attentions (bridge: it reads
a block's intermediate outputs, which needs the block's forward rewritten), conv-level ones
(sk, splat, epsa: they replace the 3x3 conv and BN; build those networks with
``create_model``), model-level ones (abn, bridge_head), models with none of the known blocks
(other blocks: ``register_block``), and attnzoo's own backbones (``create_model(...,
attention=...)`` places attention in them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .attention.identity_init import check_attention_init, identity_init
from .models.backbone import PLACEMENTS, Backbone
from .registry import attention_class, attention_level, create_attention, default_placement

__all__ = [
    "BatchNormAttention",
    "FrozenBatchNormAttention",
    "GraftSite",
    "graft",
    "register_block",
    "supported_blocks",
]

_BLOCKS: dict[type, str] = {}  # block class -> path of the BN that ends its residual branch
_KNOWN_LOADED = False


def register_block(block_class: type, last_norm: str) -> None:
    """Teach ``graft`` a residual block: ``last_norm`` is the dotted path, inside the block,
    of the ``BatchNorm2d`` whose output the shortcut is added to (``"bn3"``; ``"conv.-1"``
    for the last entry of a Sequential ``conv``)."""
    if not isinstance(block_class, type) or not issubclass(block_class, nn.Module):
        raise ValueError(f"block_class must be an nn.Module subclass, got {block_class!r}")
    _BLOCKS[block_class] = last_norm


def _load_known_blocks() -> None:
    global _KNOWN_LOADED
    if _KNOWN_LOADED:
        return
    _KNOWN_LOADED = True
    from torchvision.models import mobilenetv2 as tv_mobilenet  # a dependency, as ops.misc above
    from torchvision.models import resnet as tv_resnet

    _BLOCKS.setdefault(tv_resnet.BasicBlock, "bn2")
    _BLOCKS.setdefault(tv_resnet.Bottleneck, "bn3")
    _BLOCKS.setdefault(tv_mobilenet.InvertedResidual, "conv.-1")
    try:
        from timm.models import resnet as timm_resnet
    except ImportError:  # pragma: no cover - timm is optional
        pass
    else:
        _BLOCKS.setdefault(timm_resnet.BasicBlock, "bn2")
        _BLOCKS.setdefault(timm_resnet.Bottleneck, "bn3")


def supported_blocks() -> list[str]:
    """The block classes ``graft`` recognises, as ``module.ClassName``."""
    _load_known_blocks()
    return sorted(f"{c.__module__}.{c.__qualname__}" for c in _BLOCKS)


class BatchNormAttention(nn.BatchNorm2d):
    """A block's last BatchNorm2d followed by an attention module (child ``attention``).

    It shares the original BN's parameter and buffer objects, under the same keys, so a
    state_dict saved before grafting loads into it (only ``attention.*`` is new)."""

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, attention: nn.Module) -> BatchNormAttention:
        new = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
        )
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.attention = attention
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(super().forward(x))


class FrozenBatchNormAttention(FrozenBatchNorm2d):
    """A block's last FrozenBatchNorm2d (torchvision's detection backbones) followed by an
    attention module (child ``attention``), sharing the original's buffers under the same
    keys, as ``BatchNormAttention`` does for a BatchNorm2d."""

    @classmethod
    def from_batch_norm(
        cls, bn: FrozenBatchNorm2d, attention: nn.Module
    ) -> FrozenBatchNormAttention:
        new = cls(bn.weight.numel(), eps=bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(new, name, getattr(bn, name))
        new.attention = attention
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(super().forward(x))


_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
_GRAFTED = (BatchNormAttention, FrozenBatchNormAttention)


def _norm_channels(bn: nn.Module) -> int:
    return bn.weight.numel() if isinstance(bn, FrozenBatchNorm2d) else bn.num_features


@dataclass(frozen=True)
class GraftSite:
    """One inserted module: ``name`` is its state_dict prefix (``layer1.0.bn3.attention``),
    ``channels`` its width, ``init`` how it was initialised ("default", or for
    ``attention_init="identity"`` "exact" or "blend", see ``identity_init.py``)."""

    name: str
    channels: int
    init: str


def _block_norm_path(block: nn.Module) -> str:
    for cls in type(block).__mro__:
        if cls in _BLOCKS:
            return _BLOCKS[cls]
    raise KeyError(type(block))


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, child name, child) for a dotted path; a negative index counts from the end."""
    parent, parts = root, path.split(".")
    for part in parts[:-1]:
        parent = _child(parent, part)[1]
    name, child = _child(parent, parts[-1])
    return parent, name, child


def _child(parent: nn.Module, part: str) -> tuple[str, nn.Module]:
    if part.lstrip("-").isdigit() and int(part) < 0:
        names = list(parent._modules)
        part = names[int(part)]
    return part, parent._modules[part]


def _downsamples(block: nn.Module) -> bool:
    stride = getattr(block, "stride", None)
    if isinstance(stride, int) or isinstance(stride, tuple):
        return max(stride if isinstance(stride, tuple) else (stride,)) > 1
    for m in block.modules():
        if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)):
            s = m.stride if isinstance(m.stride, tuple) else (m.stride,)
            if max(s) > 1:
                return True
    return False


def _out_channels(module: nn.Module) -> int:
    """Channels of a module's output: its last BN's, else its last conv's."""
    norms = [m for m in module.modules() if isinstance(m, _NORMS)]
    if norms:
        return _norm_channels(norms[-1])
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1].out_channels
    raise ValueError(f"cannot tell the output channels of {type(module).__name__}")


def _check_request(model: nn.Module, attention: str, placement: str | None) -> str:
    if not isinstance(model, nn.Module):
        raise ValueError(f"graft needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, Backbone):
        raise ValueError(
            f"{type(model).__name__} is an attnzoo backbone: build it with attention instead, "
            f"create_model({model.name!r}, attention={attention!r})"
        )
    if not isinstance(attention, str) or attention in ("", "none"):
        raise ValueError(f"graft needs an attention name, got {attention!r}")
    attention_class(attention)  # unknown name: lists the valid ones
    level = attention_level(attention)
    if level != "module":
        why = {
            "block": "it reads a block's intermediate outputs, which needs the block rewritten",
            "conv": "it replaces a block's 3x3 conv and BN",
            "model": "it changes the network around the backbone",
        }[level]
        raise ValueError(
            f"graft takes module-level attentions; {attention!r} is {level}-level ({why}): "
            f"build it with create_model(<model>, attention={attention!r})"
        )
    placement = default_placement(attention) if placement is None else placement
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    return placement


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    _load_known_blocks()
    known = tuple(_BLOCKS)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, known)]
    if not blocks:
        raise ValueError(
            f"graft does not recognise any block in {type(model).__name__}: it supports "
            f"ResNet, ResNeXt and Wide ResNet (torchvision and timm BasicBlock / Bottleneck) "
            f"and torchvision MobileNetV2 (InvertedResidual); teach it other residual blocks "
            f"with attnzoo.graft.register_block(BlockClass, 'bn3')"
        )
    return blocks


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _block_channels(block: nn.Module) -> int:
    return _norm_channels(_resolve(block, _block_norm_path(block))[2])


def _plan(model: nn.Module, placement: str) -> list[tuple[str, int, Any]]:
    """(site name, channels, insert(module)) for every module to add; nothing changed yet."""
    blocks = _find_blocks(model)
    sites = []
    if placement == "block":
        qualified = {id(m): n for n, m in model.named_modules()}
        for _, block in blocks:
            parent, child, bn = _resolve(block, _block_norm_path(block))
            where = qualified[id(bn)]
            if isinstance(bn, _GRAFTED):
                raise ValueError(f"{where} already has an attention: the model is grafted")
            if not isinstance(bn, _NORMS):
                raise ValueError(
                    f"graft attaches to a BatchNorm2d or FrozenBatchNorm2d, but {where} is "
                    f"{type(bn).__name__}"
                )
            wrapper = (
                FrozenBatchNormAttention
                if isinstance(bn, FrozenBatchNorm2d)
                else BatchNormAttention
            )

            def insert(
                module: nn.Module, parent=parent, child=child, bn=bn, wrapper=wrapper
            ) -> None:
                setattr(parent, child, wrapper.from_batch_norm(bn, module))

            sites.append((f"{where}.attention", _norm_channels(bn), insert))
        return sites
    if placement == "stage":
        after = [blocks[i] for i in range(len(blocks) - 1) if _downsamples(blocks[i + 1][1])]
        if not after:
            raise ValueError(
                f"{type(model).__name__} has no stage boundary (no block downsamples after "
                f"the first): use placement='block' or 'final'"
            )
        return [_after(model, name, _block_channels(block)) for name, block in after]
    name, block = blocks[-1]
    container, _ = _parent(model, name)
    last_name = list(container._modules)[-1]
    last = container._modules[last_name]
    prefix = name.rpartition(".")[0]
    channels = _block_channels(block) if last is block else _out_channels(last)
    return [_after(model, f"{prefix}.{last_name}" if prefix else last_name, channels)]


def _after(model: nn.Module, name: str, channels: int) -> tuple[str, int, Any]:
    """A site right after module ``name`` inside its ``nn.Sequential``."""
    container, child = _parent(model, name)
    if not isinstance(container, nn.Sequential):
        raise ValueError(
            f"placement after {name} needs it inside an nn.Sequential, but its parent is "
            f"{type(container).__name__}: use placement='block'"
        )
    names = list(container._modules)
    new_name = "attention" if names[-1] == child else f"{child}_attention"
    following = names[names.index(child) + 1 : names.index(child) + 2]
    if new_name in container._modules or following in (["attention"], [f"{child}_attention"]):
        raise ValueError(f"{name} already has an attention after it: the model is grafted")
    prefix = name.rpartition(".")[0]

    def insert(module: nn.Module) -> None:
        entries = list(container._modules.items())
        container._modules.clear()
        for key, value in entries:
            container._modules[key] = value
            if key == child:
                container._modules[new_name] = module

    return (f"{prefix}.{new_name}" if prefix else new_name, channels, insert)


def graft(
    model: nn.Module,
    attention: str,
    placement: str | None = None,
    attention_init: str = "default",
    **attention_kwargs: Any,
) -> nn.Module:
    """Insert attention modules ``attention`` (a registered module-level name, built with
    ``attention_kwargs``) into ``model`` at ``placement`` (default: the attention's own,
    ``registry.default_placement``), modifying it in place, and return it.

    ``attention_init="identity"`` starts every module as the identity, so the grafted model
    computes what ``model`` did (for pretrained weights); ``"default"`` keeps each module's
    own init. ``model.graft_report`` lists the inserted modules (``GraftSite``: state_dict
    prefix, channels, init). Everything is checked and built before the model is touched, so
    on an error the model is unchanged. New modules take the model's device, dtype and
    train/eval mode."""
    placement = _check_request(model, attention, placement)
    check_attention_init(attention_init, attention)
    sites = _plan(model, placement)
    reference = next(iter(model.parameters()), None)
    built = []
    for name, channels, insert in sites:
        module = create_attention(attention, channels, **attention_kwargs)
        how = "default"
        if attention_init == "identity":
            module, how = identity_init(module)
        if reference is not None:
            module = module.to(device=reference.device, dtype=reference.dtype)
        built.append((insert, module.train(model.training), GraftSite(name, channels, how)))
    for insert, module, _ in built:
        insert(module)
    report = [site for _, _, site in built]
    model.graft_report = list(getattr(model, "graft_report", [])) + report
    return model
