"""The conversion engine: read what a checkpoint holds, compare it with the model, map and load.

Every supported source saves a torchvision-layout ResNet (``conv1, bn1, layer1..layer4,
fc``; blocks ``conv1..conv3, bn1..bn3, downsample.0/.1``), the layout attnzoo's ResNets have
too, so the backbone keys map one to one. Only the attention modules are named and laid out
differently, and a source (one file each) says how: which official keys mark which attnzoo
attention, where its modules sit (``layerX.Y.cbam.`` for our ``layerX.Y.attention.``,
``bam1.`` for our ``stage_attention.0.``), how each parameter is renamed and, where the
layouts differ, transformed (a Linear weight to a 1x1 conv, the two input channels of a
spatial conv swapped), and which ``attention_kwargs`` a model needs to compute what the
official code computes.

``load_official`` first works out the model the checkpoint needs (``Expected``: the
``create_model`` call), compares the model it was given with that, then plans every key.
With ``strict=True`` any difference is an error that names the key or setting and the
model to build instead; with ``strict=False`` what fits is loaded and the rest reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.resnet import BasicBlock, Bottleneck, ResNet
from .checkpoint import load_checkpoint, unwrap_state_dict

Transform = Callable[[torch.Tensor], torch.Tensor]

# (block, layers, groups) -> attnzoo model name (all with the 64-channel 7x7 stem).
ARCHS: dict[tuple[str, tuple[int, ...], int], str] = {
    ("basic", (2, 2, 2, 2), 1): "resnet18",
    ("basic", (3, 4, 6, 3), 1): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 1): "resnet50",
    ("bottleneck", (3, 4, 23, 3), 1): "resnet101",
    ("bottleneck", (3, 4, 6, 3), 32): "resnext50_32x4d",
}
OTHER_NAMES = {
    ("bottleneck", (3, 8, 36, 3), 1): "ResNet-152",
    ("bottleneck", (3, 24, 36, 3), 1): "ResNet-200",
    ("bottleneck", (3, 4, 23, 3), 32): "ResNeXt-101 32xNd",
}
BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.")
STEM_KEYS = ("conv1.weight",)
MAX_LISTED = 8


def as_conv1x1(t: torch.Tensor) -> torch.Tensor:
    """A Linear weight (out, in) as the weight of the equivalent 1x1 conv (out, in, 1, 1)."""
    return t[:, :, None, None] if t.dim() == 2 else t


def swap_pair(t: torch.Tensor) -> torch.Tensor:
    """Swap the two input channels of a (out, 2, k, k) conv weight ([max; mean] <-> [mean; max])."""
    return t.flip(1) if t.dim() == 4 and t.shape[1] == 2 else t


TRANSFORM_LABELS = {
    as_conv1x1: "Linear weight (out, in) -> 1x1 conv weight (out, in, 1, 1)",
    swap_pair: "spatial conv input channels swapped, official [max; mean] -> our [mean; max]",
}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _kwargs_code(kwargs: Mapping) -> str:
    return "{" + ", ".join(f"{k!r}: {v!r}" for k, v in kwargs.items()) + "}"


# --- what a checkpoint holds ---------------------------------------------------------------


@dataclass
class Backbone:
    """The ResNet a state_dict describes (from its shapes)."""

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]
    groups: int
    stem: str  # "imagenet" (7x7) | "cifar" (3x3)
    stem_width: int
    in_chans: int
    num_classes: int | None  # None: no classifier in the checkpoint
    stage_channels: tuple[int, ...]

    @property
    def model_name(self) -> str | None:
        if self.stem_width != 64:
            return None
        return ARCHS.get((self.block, self.layers, self.groups))

    def describe(self) -> str:
        key = (self.block, self.layers, self.groups)
        name = self.model_name or OTHER_NAMES.get(key)
        kind = "Bottleneck" if self.block == "bottleneck" else "BasicBlock"
        arch = f"{kind} {'-'.join(map(str, self.layers))}"
        if self.groups != 1:
            arch += f", {self.groups} groups"
        classes = "" if self.num_classes is None else f", {self.num_classes} classes"
        stem = ", 3x3 CIFAR stem" if self.stem == "cifar" else ""
        return f"{name or 'ResNet'} ({arch}{stem}{classes})"


def parse_backbone(state: Mapping[str, torch.Tensor]) -> Backbone:
    """Read block type, depth, groups, stem and classifier from a torchvision-layout state_dict."""
    stem = state.get("conv1.weight")
    counts: dict[int, set[int]] = {}
    for key in state:
        m = BLOCK_KEY.match(key)
        if m:
            counts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if stem is None or stem.dim() != 4 or sorted(counts) != [1, 2, 3, 4]:
        raise ValueError(
            "not a torchvision-layout ResNet state_dict (expected 'conv1.weight', a 4-D stem "
            "conv, and blocks 'layer1.0.conv1.weight' ... 'layer4.*'); first keys: "
            + ", ".join(list(state)[:5])
        )
    layers = tuple(max(counts[i]) + 1 for i in (1, 2, 3, 4))
    block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    conv2 = state.get("layer1.0.conv2.weight")
    groups = 1
    if conv2 is not None and conv2.dim() == 4 and conv2.shape[1]:
        groups = max(1, conv2.shape[0] // conv2.shape[1])
    last = "conv3" if block == "bottleneck" else "conv2"
    stage_channels = tuple(
        int(state[f"layer{i}.0.{last}.weight"].shape[0])
        for i in (1, 2, 3, 4)
        if f"layer{i}.0.{last}.weight" in state
    )
    fc = state.get("fc.weight")
    return Backbone(
        block=block,
        layers=layers,
        groups=groups,
        stem="imagenet" if stem.shape[-1] == 7 else "cifar" if stem.shape[-1] == 3 else "other",
        stem_width=int(stem.shape[0]),
        in_chans=int(stem.shape[1]),
        num_classes=None if fc is None else int(fc.shape[0]),
        stage_channels=stage_channels,
    )


@dataclass
class Expected:
    """The attnzoo model a checkpoint needs: a ``create_model`` call (and an extra step)."""

    backbone: Backbone
    attention: str | None
    attention_kwargs: dict = field(default_factory=dict)  # needed for the same function
    recommended: dict = field(default_factory=dict)  # training-only settings (BN momentum)
    extra_step: str | None = None  # code to run on ``model`` after create_model
    extra: Callable[[nn.Module], None] | None = None
    label: str = ""  # e.g. "CBAM in every block"

    def create_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.attention is not None:
            kwargs["attention"] = self.attention
            merged = {**self.attention_kwargs, **self.recommended}
            if merged:
                kwargs["attention_kwargs"] = merged
        b = self.backbone
        if b.num_classes not in (None, 1000):
            kwargs["num_classes"] = b.num_classes
        if b.stem == "cifar":
            kwargs["stem"] = "cifar"
        if b.in_chans != 3:
            kwargs["in_chans"] = b.in_chans
        return kwargs

    def call(self) -> str:
        """The code that builds the matching model, or a sentence saying none exists."""
        name = self.backbone.model_name
        if name is None or self.backbone.stem == "other":
            return f"no attnzoo model has this backbone: {self.backbone.describe()}"
        args = [repr(name)]
        for key, value in self.create_kwargs().items():
            args.append(f"{key}={_kwargs_code(value) if isinstance(value, dict) else repr(value)}")
        code = f"model = attnzoo.create_model({', '.join(args)})"
        if self.extra_step:
            code += "\n" + self.extra_step
        return code

    def describe(self) -> str:
        what = self.backbone.describe()
        return f"a {what} with {self.label}" if self.attention else f"a plain {what}"

    def build(self) -> nn.Module:
        from ..registry import create_model

        name = self.backbone.model_name
        if name is None or self.backbone.stem == "other":
            raise ValueError(self.call())
        model = create_model(name, **self.create_kwargs())
        if self.extra is not None:
            self.extra(model)
        return model


# --- how a source names things ------------------------------------------------------------


class AttentionMapping:
    """How one source names and lays out one attnzoo attention (subclass per source)."""

    name: str = ""  # attnzoo registry name
    placement: str = "block"  # where the source puts it: "block" | "stage"
    label: str = ""  # e.g. "CBAM in every block"
    marker: re.Pattern = re.compile(r"$^")  # official keys that belong to this attention

    def official_prefix(self, ours: str) -> str:
        """Official prefix for our module prefix ``layerX.Y.attention.`` or
        ``stage_attention.I.``."""
        raise NotImplementedError

    def rename(self, rest: str, module: nn.Module) -> tuple[str, Transform | None] | None:
        """Official name (after the prefix) and transform for our key ``rest``; None: the
        source has no such parameter."""
        raise NotImplementedError

    def expected(self, state: Mapping[str, torch.Tensor], backbone: Backbone) -> Expected:
        return Expected(backbone, self.name, label=self.label)

    def check_module(self, module: nn.Module, where: str) -> list[str]:
        """Differences in function that shapes do not show (e.g. BAM's combine)."""
        return []

    def notes(self, module: nn.Module) -> list[str]:
        """Remarks that do not change the function (e.g. a training-only BN momentum)."""
        return []


class Source:
    """A repository whose checkpoints load: its attention mappings and its published
    checkpoints ((what, download link), for the docs). Subclass to refuse layouts."""

    def __init__(
        self,
        name: str,
        title: str,
        url: str,
        attentions: tuple[AttentionMapping, ...],
        checkpoints: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.name = name
        self.title = title
        self.url = url
        self.attentions = attentions
        self.checkpoints = checkpoints

    def refuse_layout(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """A reason why no attnzoo model can hold this state_dict at all, or None."""
        return None

    def detect(self, state: Mapping[str, torch.Tensor]) -> AttentionMapping | None:
        found = [a for a in self.attentions if any(a.marker.search(k) for k in state)]
        if len(found) > 1:
            raise ValueError(
                f"{self.name} checkpoint mixes attentions ({', '.join(a.name for a in found)})"
            )
        return found[0] if found else None


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


def official_sources() -> dict[str, str]:
    """The supported sources: name -> what they are (repository, models)."""
    return {name: f"{s.title} ({s.url})" for name, s in SOURCES.items()}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(
            f"unknown source {name!r}; choose one of: {', '.join(SOURCES)} "
            "(attnzoo.convert.official_sources() describes them)"
        )
    return SOURCES[name]


def guess_source(state: Mapping[str, torch.Tensor], exclude: str = "") -> str | None:
    """A source whose attention keys this state_dict has (for error messages)."""
    for name, source in SOURCES.items():
        if name != exclude and any(a.marker.search(k) for a in source.attentions for k in state):
            return name
    return None


# --- the report and the load --------------------------------------------------------------


@dataclass
class ConvertReport:
    """What ``load_official`` did. ``loaded``: our keys filled from the checkpoint;
    ``transformed``: of those, the ones whose values were reshaped or reordered (and how);
    ``missing`` / ``unexpected`` / ``mismatched`` / ``problems``: what did not fit (always
    empty after a strict load); ``notes``: remarks that do not change the function."""

    source: str
    checkpoint: str
    create_model_call: str
    loaded: list[str] = field(default_factory=list)
    transformed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.problems)

    def __str__(self) -> str:
        lines = [
            f"load_official(source={self.source!r}): {len(self.loaded)} tensors loaded from "
            f"{self.checkpoint.removeprefix('a ')}",
            f"  matching model: {self.create_model_call}",
        ]
        for title, items in (
            ("transformed", self.transformed),
            ("problems", self.problems),
            ("missing from the checkpoint (kept as initialised)", self.missing),
            ("unused checkpoint keys", self.unexpected),
            ("shape mismatches (skipped)", self.mismatched),
            ("notes", self.notes),
        ):
            if items:
                lines.append(f"  {title}: {len(items)}")
                lines += [f"    {item}" for item in _clip(items)]
        return "\n".join(lines)


def _clip(items: list[str]) -> list[str]:
    if len(items) <= MAX_LISTED:
        return items
    return items[:MAX_LISTED] + [f"... and {len(items) - MAX_LISTED} more"]


def _analyse(
    src: Source, state: Mapping[str, torch.Tensor]
) -> tuple[AttentionMapping | None, Expected]:
    """The source's attention mapping for this state_dict and the model it needs."""
    reason = src.refuse_layout(state)
    if reason is not None:
        raise ValueError(f"load_official(source={src.name!r}): {reason}")
    mapping = src.detect(state)
    if mapping is None:
        other = guess_source(state, exclude=src.name)
        if other is not None:
            example = next(
                k for k in state for a in SOURCES[other].attentions if a.marker.search(k)
            )
            raise ValueError(
                f"load_official(source={src.name!r}): the checkpoint's attention keys (e.g. "
                f"{example!r}) are not {src.name}'s; they look like source={other!r}"
            )
    backbone = parse_backbone(state)
    if mapping is None:
        return None, Expected(backbone, None)
    return mapping, mapping.expected(state, backbone)


def _compare_model(model: ResNet, expected: Expected) -> list[str]:
    b = expected.backbone
    problems = []
    block = {Bottleneck: "bottleneck", BasicBlock: "basic"}.get(model.block, "other")
    ours = (block, tuple(model.layers), model.groups, model.stem_width)
    if ours != (b.block, b.layers, b.groups, b.stem_width):
        problems.append(f"the checkpoint is a {b.describe()}, the model a {model.name}")
    else:
        if b.stem == "other":
            problems.append("the checkpoint's stem conv is neither 7x7 nor 3x3: no attnzoo stem")
        elif b.stem != model.stem:
            kind = "7x7 ImageNet" if b.stem == "imagenet" else "3x3 stride-1 (no max-pool)"
            problems.append(
                f"the checkpoint has the {kind} stem: stem={b.stem!r}, not {model.stem!r}"
            )
        if b.num_classes is not None and b.num_classes != model.num_classes:
            problems.append(
                f"the checkpoint has {b.num_classes} classes, the model {model.num_classes} "
                "(or drop 'fc.weight' and 'fc.bias' from the state_dict and pass strict=False "
                "to keep a new classifier)"
            )
        if b.in_chans != model.in_chans:
            problems.append(
                f"the checkpoint takes {b.in_chans} input channels, the model {model.in_chans}"
            )
    if model.shortcut != "B":
        problems.append("the official ResNets have 1x1-conv projection shortcuts: shortcut='B'")
    if model.bottleneck_stride != "3x3" and b.block == "bottleneck":
        problems.append(
            "the official Bottlenecks stride in the 3x3 conv (torchvision's v1.5): "
            "bottleneck_stride='3x3'"
        )
    attention, _, placement = model._placed
    if attention != expected.attention:
        has = f"attention={attention!r}" if attention else "no attention"
        problems.append(
            f"the checkpoint has {expected.label or 'no attention modules'}, the model {has}"
        )
    elif attention is not None and placement != _placement_of(expected):
        problems.append(f"the checkpoint has {expected.label}, the model placement={placement!r}")
    return problems


def _placement_of(expected: Expected) -> str:
    from ..registry import default_placement

    return default_placement(expected.attention)


def _our_modules(model: ResNet) -> list[tuple[str, nn.Module]]:
    """(our prefix, module) for every attention module a source could map."""
    found = []
    for s, stage in enumerate(model.stages()):
        for j, block in enumerate(stage):
            att = getattr(block, "attention", None)
            if att is not None and not isinstance(att, nn.Identity):
                found.append((f"{model.stage_names[s]}.{j}.attention.", att))
    if model.stage_attention is not None:
        found += [(f"stage_attention.{i}.", m) for i, m in enumerate(model.stage_attention)]
    if model.final_attention is not None:
        found.append(("final_attention.", model.final_attention))
    return found


def load_official(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    source: str,
    strict: bool = True,
) -> ConvertReport:
    """Load an official checkpoint's weights into an attnzoo ResNet.

    ``state_dict``: the checkpoint's state_dict, the checkpoint dict that wraps it
    (``{"state_dict": ..., "epoch": ...}``, ``module.`` prefixes and all), or a file path
    (read with ``load_checkpoint``: ``weights_only=True`` or safetensors). ``source``: one
    of ``official_sources()``. The model must be the one the checkpoint needs: the error
    (and ``report.create_model_call``) gives the ``attnzoo.create_model`` call that builds it.

    ``strict=True``: refuse (``ValueError``) unless every model tensor is filled from the
    checkpoint with the right shape, every checkpoint tensor is used, and the model computes
    what the official code computes (e.g. BAM's ``combine="product"``). ``strict=False``:
    load every tensor that fits and list the rest in the report (a new classifier for
    fine-tuning: drop ``fc.*`` from the state_dict first). Returns a ``ConvertReport``.
    """
    src = get_source(source)
    if isinstance(state_dict, (str, os.PathLike)):
        state = load_checkpoint(state_dict)
    else:
        state = unwrap_state_dict(state_dict)
    if not isinstance(model, ResNet):
        raise ValueError(
            f"load_official loads into attnzoo ResNets (resnet18/34/50/101, resnext50_32x4d, "
            f"built by attnzoo.create_model without a model-level attention); got "
            f"{type(model).__name__}"
        )
    mapping, expected = _analyse(src, state)
    problems = _compare_model(model, expected)
    modules = _our_modules(model)
    notes: list[str] = []
    if mapping is not None:
        for prefix, module in modules:
            problems += mapping.check_module(module, prefix)
        if modules:
            notes += mapping.notes(modules[0][1])
    problems = list(dict.fromkeys(problems))

    # Plan: our key -> (official key, transform).
    ours = model.state_dict()
    by_prefix = dict(modules)
    plan: dict[str, tuple[str | None, Transform | None]] = {}
    for key in ours:
        prefix = next((p for p in by_prefix if key.startswith(p)), None)
        if prefix is None:
            plan[key] = (key, None)  # the backbone: the same names everywhere
            continue
        kind = "stage" if prefix.startswith("stage_attention.") else "block"
        if mapping is None or prefix == "final_attention." or kind != mapping.placement:
            plan[key] = (None, None)  # no official counterpart (a problem says why)
            continue
        renamed = mapping.rename(key[len(prefix) :], by_prefix[prefix])
        if renamed is None:
            plan[key] = (None, None)
        else:
            plan[key] = (mapping.official_prefix(prefix) + renamed[0], renamed[1])

    report = ConvertReport(source, expected.describe(), expected.call(), notes=notes)
    used: set[str] = set()
    values: dict[str, torch.Tensor] = {}
    for key, (official, transform) in plan.items():
        if official is None or official not in state:
            if not key.endswith("num_batches_tracked"):  # absent from pre-0.4.1 checkpoints
                report.missing.append(
                    key if official in (None, key) else f"{key} (checkpoint key {official!r})"
                )
            continue
        used.add(official)
        value = state[official]
        converted = transform(value) if transform is not None else value
        if _shape(converted) != _shape(ours[key]):
            report.mismatched.append(
                f"{key}: model {_shape(ours[key])}, checkpoint {official!r} {_shape(value)}"
            )
            continue
        values[key] = converted
        report.loaded.append(key)
        if transform is not None:
            label = TRANSFORM_LABELS.get(transform, transform.__name__)
            report.transformed.append(f"{key} <- {official}: {label}")
    report.unexpected = [k for k in state if k not in used]
    report.problems = problems

    if strict and not report.ok:
        raise ValueError(_refusal(src, expected, report))
    with torch.no_grad():
        full = dict(ours)
        full.update(values)
        model.load_state_dict(full, strict=True)
    return report


def _refusal(src: Source, expected: Expected, report: ConvertReport) -> str:
    lines = [f"load_official(source={src.name!r}): the checkpoint does not fit this model."]
    lines += [f"- {p}" for p in report.problems]
    listed = (
        ("shape mismatches", report.mismatched),
        ("model tensors the checkpoint lacks", report.missing),
        ("checkpoint tensors the model has no place for", report.unexpected),
    )
    if report.problems:  # the keys follow from the problems above: counts only
        counts = [f"{len(items)} {title}" for title, items in listed if items]
        if counts:
            lines.append(f"- hence {', '.join(counts)}")
    else:
        for title, items in listed:
            if items:
                lines.append(f"- {title} ({len(items)}):")
                lines += [f"    {item}" for item in _clip(items)]
    lines.append(f"The checkpoint is {expected.describe()}; build the matching model with:")
    lines += ["    " + line for line in expected.call().splitlines()]
    return "\n".join(lines)


def create_official_model(
    checkpoint: Mapping[str, torch.Tensor] | str | os.PathLike, source: str
) -> tuple[nn.Module, ConvertReport]:
    """Build the attnzoo model an official checkpoint needs and load it (strictly).
    Returns ``(model, report)``; ``report.create_model_call`` is the code it ran."""
    src = get_source(source)
    if isinstance(checkpoint, (str, os.PathLike)):
        state = load_checkpoint(checkpoint)
    else:
        state = unwrap_state_dict(checkpoint)
    _, expected = _analyse(src, state)
    model = expected.build()
    return model, load_official(model, state, source)
