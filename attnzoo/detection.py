"""attnzoo's attention ResNets as torchvision detection backbones (ResNet + FPN).

``fpn_backbone("resnet50", attention="coord")`` returns a torchvision ``BackboneWithFPN``
that ``torchvision.models.detection.FasterRCNN`` (or MaskRCNN, RetinaNet, ...) takes as its
``backbone``, built like torchvision's ``resnet_fpn_backbone`` but from attnzoo's ResNets
(``attnzoo/models/resnet.py``), so the attention runs wherever the model puts it::

    from torchvision.models.detection import FasterRCNN
    model = FasterRCNN(fpn_backbone("resnet50", attention="cbam"), num_classes=91)

Conventions taken from torchvision's ``resnet_fpn_backbone``:

- Returned layers: ``returned_layers`` picks stages 1..4 (``layer1`` ... ``layer4``); the
  feature maps are named "0", "1", ... in that order, and the FPN adds "pool" (a stride-2
  max-pool of the last level, ``LastLevelMaxPool``) unless ``extra_blocks`` says otherwise.
  With the ImageNet stem the strides are 4, 8, 16 and 32; every FPN level has
  ``out_channels`` (256) channels.
- Trainable layers: the last ``trainable_layers`` of layer4, layer3, layer2, layer1, conv1
  (and bn1 with 5) train, the rest is frozen (``requires_grad=False``). An attention module
  trains with the stage it belongs to: in-block modules are inside their stage already,
  ``stage_attention[i]`` (after stage i + 1) goes with ``layer{i+1}`` and
  ``final_attention`` with layer4.
- Norm layer: ``norm_layer=None`` gives ``FrozenBatchNorm2d`` when ``pretrained`` is given
  (torchvision's choice for pretrained backbones: detection batches are too small for batch
  statistics) and trainable ``nn.BatchNorm2d`` otherwise. With ``FrozenBatchNorm2d`` every
  ``BatchNorm2d`` of the backbone, those inside attention modules included, becomes frozen
  with its current statistics and affine values. The ``BatchNorm1d`` layers in BAM's and
  bridge's MLPs stay ordinary BN.

Differences from torchvision, and why:

- The body is not torchvision's ``IntermediateLayerGetter``, which runs the model's top-level
  children in registration order. attnzoo's ResNet registers ``maxpool`` before ``bn1`` and
  keeps stage-boundary attention (BAM, ``placement="stage"``) in ``stage_attention``, after
  the stages, so the getter would run them in the wrong order or not at all.
  ``ResNetFeatures`` runs the model's own ``forward_stem`` and ``forward_stage`` instead: a
  returned map is a stage's output after its stage-boundary (or final) attention, i.e. what
  the next stage sees.
- ``trainable_layers`` defaults to 3 as in ``resnet_fpn_backbone``, which freezes the stem
  and layer1 even without pretrained weights; train from scratch with
  ``trainable_layers=5``.

Supported: every ImageNet-style ResNet in ``attnzoo/models/resnet.py`` (resnet18 ...
resnet101, resnext50_32x4d, the wide ResNet-18s) with no attention or any module-, block-
(bridge) or conv-level (sk, splat, epsa) attention, in any ``placement``. Not supported:
model-level attentions (abn, bridge_head), which add a classification branch or head that
a detector has no use for, and the other backbones (CIFAR ResNets, DenseNet, MobileNet).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from . import registry
from .models import resnet as resnet_models
from .registry import NO_ATTENTION, attention_level, create_model, list_models

STAGES = ("layer1", "layer2", "layer3", "layer4")
# Frozen first, as in torchvision: trainable_layers=k trains the first k of these.
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def resnet_names() -> list[str]:
    """The registered models ``fpn_backbone`` takes: attnzoo's ImageNet-style ResNets."""
    return [
        n
        for n in list_models()
        if getattr(registry.model_entrypoint(n), "__module__", None) == resnet_models.__name__
    ]


class ResNetFeatures(nn.Module):
    """The feature extractor of a ``BackboneWithFPN``: runs an attnzoo ResNet's stem and
    stages (with their stage-boundary and final attention) up to the last returned stage,
    and returns ``{name: map}`` for the stages in ``return_layers`` (``{"layer1": "0"}``)."""

    def __init__(self, backbone: resnet_models.ResNet, return_layers: dict[str, str]) -> None:
        super().__init__()
        unknown = sorted(set(return_layers) - set(backbone.stage_names))
        if unknown:
            raise ValueError(
                f"return_layers {unknown} are not stages of {backbone.name}; "
                f"choose from: {', '.join(backbone.stage_names)}"
            )
        self.return_layers = dict(return_layers)
        self.last_stage = max(backbone.stage_names.index(n) for n in return_layers)
        # Drop what never runs (the classifier, stages after the last returned one and their
        # attention), as IntermediateLayerGetter does, so no parameter goes unused.
        backbone.fc = nn.Identity()
        for index in range(self.last_stage + 1, len(backbone.stage_names)):
            setattr(backbone, backbone.stage_names[index], nn.Identity())
            if backbone.stage_attention is not None and index < len(backbone.stage_attention):
                backbone.stage_attention[index] = nn.Identity()
        if self.last_stage < len(backbone.stage_names) - 1:
            backbone.final_attention = None
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = OrderedDict()
        x = self.backbone.forward_stem(x)
        for index in range(self.last_stage + 1):
            x = self.backbone.forward_stage(index, x)
            name = self.backbone.stage_names[index]
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by a ``FrozenBatchNorm2d``
    with the same statistics, affine values and eps; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def _trainable_prefixes(trainable_layers: int) -> tuple[str, ...]:
    layers = list(TRAINABLE_ORDER[:trainable_layers])
    if trainable_layers == 5:
        layers.append("bn1")
    for index, stage in enumerate(STAGES):
        if stage in layers:
            layers.append(f"stage_attention.{index}")
    if "layer4" in layers:
        layers.append("final_attention")
    return tuple(layers)


def fpn_backbone(
    name: str,
    attention: str | None = None,
    pretrained: Any = None,
    trainable_layers: int = 3,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    norm_layer: Callable[..., nn.Module] | None = None,
    *,
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    **model_kwargs: Any,
) -> BackboneWithFPN:
    """attnzoo ResNet ``name`` with ``attention`` plus an FPN, as torchvision's
    ``resnet_fpn_backbone`` builds one (see this module's docstring for the conventions).

    Args:
        name: an ImageNet-style attnzoo ResNet (``resnet_names()``).
        attention: a registered attention name (not model-level), or None.
        pretrained: passed to ``create_model(..., pretrained=pretrained)`` when not None.
        trainable_layers: 0..5 stages left trainable, counted from layer4.
        returned_layers: stages (1..4) whose maps feed the FPN, increasing.
        norm_layer: ``FrozenBatchNorm2d`` or ``nn.BatchNorm2d`` for the backbone's BN; None:
            frozen when ``pretrained`` is given, trainable BN otherwise.
        out_channels: channels of every FPN level.
        extra_blocks: the FPN's extra levels (default ``LastLevelMaxPool``: "pool").
        **model_kwargs: further ``create_model`` options (``attention_kwargs``, ``placement``,
            ``stem``, ...).
    """
    if name not in resnet_names():
        raise ValueError(
            f"fpn_backbone needs one of attnzoo's ImageNet-style ResNets, got {name!r}; "
            f"choose one of: {', '.join(resnet_names())}"
        )
    if attention not in NO_ATTENTION and attention_level(attention) == "model":
        raise ValueError(
            f"attention {attention!r} is model-level (it adds a branch or head around the "
            f"backbone), which a detection backbone cannot use; choose a module-, block- or "
            f"conv-level one: {', '.join(registry.list_attentions(('module', 'block', 'conv')))}"
        )
    if (
        not isinstance(trainable_layers, int)
        or isinstance(trainable_layers, bool)
        or not 0 <= trainable_layers <= 5
    ):
        raise ValueError(f"trainable_layers must be an int in 0..5, got {trainable_layers!r}")
    returned = tuple(returned_layers)
    if (
        not returned
        or any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 4 for k in returned)
        or list(returned) != sorted(set(returned))
    ):
        raise ValueError(
            f"returned_layers must be increasing stage numbers in 1..4, got {returned_layers!r}"
        )
    if norm_layer is None:
        norm_layer = FrozenBatchNorm2d if pretrained is not None else nn.BatchNorm2d
    if norm_layer not in (FrozenBatchNorm2d, nn.BatchNorm2d):
        raise ValueError(
            f"norm_layer must be torchvision.ops.misc.FrozenBatchNorm2d, nn.BatchNorm2d or "
            f"None, got {norm_layer!r}"
        )
    if pretrained is not None:
        model_kwargs["pretrained"] = pretrained
    backbone = create_model(name, attention=attention, **model_kwargs)
    if norm_layer is FrozenBatchNorm2d:
        freeze_batch_norm(backbone)

    trainable = _trainable_prefixes(trainable_layers)
    for param_name, param in backbone.named_parameters():
        if not any(param_name == p or param_name.startswith(p + ".") for p in trainable):
            param.requires_grad_(False)

    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned)}
    in_channels_list = [backbone.stage_channels[k - 1] for k in returned]
    body = ResNetFeatures(backbone, return_layers)
    # BackboneWithFPN wraps its backbone in an IntermediateLayerGetter; swap ours in (see the
    # module docstring for why).
    model = BackboneWithFPN(
        backbone, return_layers, in_channels_list, out_channels, extra_blocks=extra_blocks
    )
    model.body = body
    return model
