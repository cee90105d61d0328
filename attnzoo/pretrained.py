"""Pretrained backbones: ``create_model(name, attention=..., pretrained=SOURCE)``.

    model = attnzoo.create_model("resnet50", attention="ham", pretrained="torchvision")
    print(model.pretrained_report)  # what was loaded, what is new

``pretrained`` is one of:

- ``"torchvision"``: torchvision's default ImageNet weights of the same architecture, read
  through torchvision's own weights API (``get_model_weights(name).DEFAULT``), which downloads
  once into ``$TORCH_HOME/hub/checkpoints`` and reads that cache afterwards; the file is
  read with ``weights_only=True``. For the models whose key names are torchvision's
  (``TORCHVISION_MODELS``: resnet18/34/50/101, resnext50_32x4d, mobilenet_v2).
- ``"timm:<name>"``: a timm checkpoint (any pretrained tag, e.g. ``timm:resnet50.a1_in1k``),
  downloaded by timm into the Hugging Face cache and mapped by ``attnzoo.convert``'s
  ``"timm"`` source (``create_official_model``), which refuses the timm layouts that are not
  ours (deep stems, avg-down shortcuts, ...).
- a path: a state_dict file (``.safetensors``, or ``.pth`` / ``.pt`` read with
  ``weights_only=True``: a pickle that holds anything but tensors is refused), or a directory
  written by ``attnzoo export`` (``config.json`` + ``model.safetensors``, see ``hub.py``).

The rule: every backbone tensor of the model must come from the checkpoint, with its shape,
and every checkpoint tensor must have a place in the model; otherwise ``ValueError``, naming
the keys and the fix. What may be left as initialised:

- the attention modules' own tensors, when the checkpoint has none (a plain ImageNet
  backbone under a new attention): listed in ``report.missing_attention``;
- the classifier, when ``num_classes`` differs from the checkpoint's class count (or the
  checkpoint has no classifier): a new head for fine-tuning, listed in
  ``report.new_classifier``. ``num_classes=None`` takes the checkpoint's class count.

The model carries the outcome as ``model.pretrained_report`` (a ``PretrainedReport``).
torchvision and timm weights are for the standard architecture, so architecture options
(``stem``, ``shortcut``, ``bottleneck_stride``, ``in_chans``, ``width_mult``) must keep their
defaults; ``placement``, ``attention_site`` and ``dropout`` are free.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCHVISION_MODELS = (
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
)
# Model options that do not change what the pretrained tensors compute.
NEUTRAL_OPTIONS = ("placement", "attention_site", "dropout")
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
MAX_LISTED = 6
SOURCES_HELP = (
    "'torchvision', 'timm:<name>' (e.g. 'timm:resnet50.a1_in1k'), or a path to a "
    ".safetensors / .pth state_dict or an `attnzoo export` directory"
)


@dataclass
class PretrainedReport:
    """What ``create_model(..., pretrained=...)`` loaded (``model.pretrained_report``).

    ``source``: where the weights came from; ``loaded``: the model's keys filled from the
    checkpoint; ``missing_attention``: the attention modules' keys the checkpoint has no
    values for (kept as initialised); ``new_classifier``: the classifier's keys kept as
    initialised because the class count differs (``checkpoint_num_classes`` vs
    ``num_classes``) or the checkpoint has no classifier."""

    source: str
    num_classes: int
    checkpoint_num_classes: int | None
    loaded: list[str] = field(default_factory=list)
    missing_attention: list[str] = field(default_factory=list)
    new_classifier: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"pretrained from {self.source}: {len(self.loaded)} tensors loaded"]
        if self.missing_attention:
            lines.append(
                f"  attention tensors kept as initialised ({len(self.missing_attention)}): "
                + _listed(self.missing_attention)
            )
        if self.new_classifier:
            was = self.checkpoint_num_classes
            why = "no classifier in the checkpoint" if was is None else f"{was} -> "
            if was is not None:
                why += f"{self.num_classes} classes"
            lines.append(f"  new classifier ({why}): {_listed(self.new_classifier)}")
        return "\n".join(lines)


@dataclass
class _Weights:
    """A source's tensors, in attnzoo key names."""

    state: dict[str, torch.Tensor]
    source: str
    config: dict | None = None  # an export's config.json
    hint: str = ""  # how to build the model these weights are for


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _builder_defaults(name: str) -> dict[str, Any]:
    from .registry import model_entrypoint

    params = inspect.signature(model_entrypoint(name)).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _check_standard_architecture(name: str, model_kwargs: Mapping, source: str) -> None:
    defaults = _builder_defaults(name)
    for key, value in model_kwargs.items():
        if key in NEUTRAL_OPTIONS or key not in defaults or value == defaults[key]:
            continue
        raise ValueError(
            f"pretrained={source!r}: these are weights of the standard {name} "
            f"({key}={defaults[key]!r}); drop {key}={value!r}, or train from scratch "
            "(pretrained=None)"
        )


# --- sources -------------------------------------------------------------------------------


def _torchvision_weights(name: str, progress: bool) -> _Weights:
    if name not in TORCHVISION_MODELS:
        raise ValueError(
            f"pretrained='torchvision': no torchvision weights have the layout of {name!r}; "
            f"torchvision weights load into: {', '.join(TORCHVISION_MODELS)}"
        )
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    try:
        # weights_only: the cached file is read without running any pickled code.
        state = weights.get_state_dict(progress=progress, weights_only=True)
    except OSError as e:  # no network (URLError), a read-only cache, ...
        file = weights.url.rsplit("/", 1)[-1]
        raise RuntimeError(
            f"cannot get torchvision's {weights} ({weights.url}): {e}; connect once, or put "
            f"the file in $TORCH_HOME/hub/checkpoints/{file} (TORCH_HOME defaults to "
            "~/.cache/torch)"
        ) from e
    except Exception as e:  # a corrupt or foreign file in the cache
        raise ValueError(
            f"cannot read torchvision's {weights} from its cache ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); delete the cached "
            f"{weights.url.rsplit('/', 1)[-1]} under $TORCH_HOME/hub/checkpoints to download "
            "it again"
        ) from e
    from .convert import unwrap_state_dict

    return _Weights(unwrap_state_dict(state), f"torchvision {weights}")


def _timm_state_dict(timm_name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``timm_name`` (timm downloads them into the HF cache)."""
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=True)
    except RuntimeError as e:  # timm's "Unknown model (...)"
        raise ValueError(f"pretrained='timm:{timm_name}': {e}") from e
    return model.state_dict()


def _timm_weights(timm_name: str, name: str) -> _Weights:
    from .convert import create_official_model

    if not timm_name:
        raise ValueError("pretrained='timm:' needs a timm model name, e.g. 'timm:resnet50'")
    try:
        official, report = create_official_model(_timm_state_dict(timm_name), "timm")
    except ValueError as e:
        raise ValueError(f"pretrained='timm:{timm_name}': {e}") from e
    if official.name != name:
        raise ValueError(
            f"pretrained='timm:{timm_name}' holds a {official.name}, not a {name}; the model "
            f"it fits: {report.create_model_call}"
        )
    return _Weights(
        official.state_dict(), f"timm {timm_name}", hint=f"it fits: {report.create_model_call}"
    )


def _file_weights(path: Path) -> _Weights:
    from safetensors import SafetensorError

    from .convert import load_checkpoint

    if not path.is_file():
        raise FileNotFoundError(f"pretrained={str(path)!r}: no such file or directory")
    try:
        state = load_checkpoint(path)
    except (RuntimeError, EOFError, SafetensorError, OSError) as e:  # truncated, corrupt
        raise ValueError(
            f"cannot read the checkpoint {path} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); is the file complete?"
        ) from e
    return _Weights(state, str(path))


def read_export_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an ``attnzoo export`` directory, checked for the keys
    ``create_model`` needs."""
    path = Path(directory) / EXPORT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an `attnzoo export` directory (no {EXPORT_CONFIG}); give a "
            "directory written by `attnzoo export RUN_DIR OUT_DIR`, or a weights file"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise ValueError(f"{path} has no 'model' name: it was not written by `attnzoo export`")
    for key in ("attention_kwargs", "model_kwargs"):
        if not isinstance(config.setdefault(key, {}), dict):
            raise ValueError(f"{path}: {key} must be a mapping")
    return config


def export_create_call(config: Mapping[str, Any]) -> str:
    """The ``attnzoo.create_model`` call an export's config.json describes."""
    args = [repr(config["model"]), f"num_classes={config.get('num_classes')!r}"]
    if config.get("attention"):
        args.append(f"attention={config['attention']!r}")
    if config.get("attention_kwargs"):
        args.append(f"attention_kwargs={config['attention_kwargs']!r}")
    args += [f"{k}={v!r}" for k, v in config.get("model_kwargs", {}).items()]
    return f"attnzoo.create_model({', '.join(args)})"


def _export_weights(directory: Path, name: str, model_kwargs: Mapping) -> _Weights:
    config = read_export_config(directory)
    call = export_create_call(config)
    fix = f"build it as exported with attnzoo.hub.load_pretrained({str(directory)!r}), i.e. {call}"
    if config["model"] != name:
        raise ValueError(
            f"pretrained={str(directory)!r} holds a {config['model']}, not a {name}; {fix}"
        )
    defaults = _builder_defaults(name)
    exported = config["model_kwargs"]
    for key in sorted(set(exported) | set(model_kwargs)):
        if key in NEUTRAL_OPTIONS:
            continue
        theirs, ours = (
            exported.get(key, defaults.get(key)),
            model_kwargs.get(key, defaults.get(key)),
        )
        if theirs != ours:
            raise ValueError(
                f"pretrained={str(directory)!r} was trained with {key}={theirs!r}, the model has "
                f"{key}={ours!r}; pass {key}={theirs!r}, or {fix}"
            )
    weights = _file_weights(directory / EXPORT_WEIGHTS)
    return _Weights(weights.state, str(directory), config, hint=f"it was exported as {call}")


def _read(
    pretrained: str | os.PathLike, name: str, model_kwargs: Mapping, progress: bool
) -> _Weights:
    if isinstance(pretrained, str) and pretrained == "torchvision":
        _check_standard_architecture(name, model_kwargs, pretrained)
        return _torchvision_weights(name, progress)
    if isinstance(pretrained, str) and pretrained.startswith("timm:"):
        _check_standard_architecture(name, model_kwargs, pretrained)
        return _timm_weights(pretrained[len("timm:") :], name)
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise ValueError(f"pretrained must be {SOURCES_HELP}; got {pretrained!r}")
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return _export_weights(path, name, model_kwargs)
    if (
        not path.exists()
        and isinstance(pretrained, str)
        and not path.suffix
        and "/" not in pretrained
    ):
        raise ValueError(f"unknown pretrained source {pretrained!r}; give {SOURCES_HELP}")
    return _file_weights(path)


# --- loading -------------------------------------------------------------------------------


def _backbone_of(model: nn.Module) -> nn.Module:
    """The network that holds the classifier (a model-level attention wraps it)."""
    from .models.backbone import Backbone

    if isinstance(model, Backbone):
        return model
    inner = getattr(model, "backbone", None)
    if isinstance(inner, Backbone):
        return inner
    raise ValueError(f"pretrained weights load into attnzoo models; got {type(model).__name__}")


def classifier_prefix(model: nn.Module) -> str:
    """The state_dict prefix of the model's classifier (``"fc."``, ``"classifier."``, or
    ``"backbone.fc."`` under a model-level attention)."""
    head = _backbone_of(model).get_classifier()
    return next(n for n, m in model.named_modules() if m is head) + "."


def classifier_classes(state: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """The class count of the classifier under ``prefix`` in ``state`` (None: no classifier)."""
    weights = [v for k, v in state.items() if k.startswith(prefix) and k.endswith("weight")]
    return int(weights[-1].shape[0]) if weights and weights[-1].dim() == 2 else None


def _plain_model(name: str, num_classes: int | None, model_kwargs: Mapping) -> nn.Module:
    """The model without attention, on the meta device (its key names and shapes only)."""
    from .registry import create_model

    with torch.device("meta"):
        return create_model(name, num_classes=num_classes, **model_kwargs)


def _load(
    model: nn.Module, weights: _Weights, plain_keys: set[str], describe: str
) -> PretrainedReport:
    ours = model.state_dict()
    wrapped = _backbone_of(model) is not model
    if wrapped:  # a model-level attention: the backbone's keys carry "backbone."
        plain_keys = {"backbone." + k for k in plain_keys}
    prefix = (
        "backbone." if wrapped and not any(k.startswith("backbone.") for k in weights.state) else ""
    )
    state = {prefix + k: v for k, v in weights.state.items()}
    head = classifier_prefix(model)
    report = PretrainedReport(
        weights.source, _backbone_of(model).num_classes, classifier_classes(state, head)
    )
    unexpected = [k for k in state if k not in ours]
    mismatched = []
    for key, value in state.items():
        if key not in ours or value.shape == ours[key].shape:
            continue
        if key.startswith(head) and value.shape[1:] == ours[key].shape[1:]:
            report.new_classifier.append(key)  # another class count: a new head
        else:
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}"
            )
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    report.new_classifier += [k for k in missing if k.startswith(head)]
    report.new_classifier.sort(key=list(ours).index)  # the model's order, whatever the file's
    report.missing_attention = [k for k in missing if k not in plain_keys]
    missing_backbone = [k for k in missing if k in plain_keys and not k.startswith(head)]
    if unexpected or mismatched or missing_backbone:
        raise ValueError(_refusal(weights, describe, unexpected, mismatched, missing_backbone))
    skipped = set(report.new_classifier)
    values = {k: v for k, v in state.items() if k not in skipped}
    report.loaded = list(values)
    with torch.no_grad():
        model.load_state_dict({**ours, **values}, strict=True)
    return report


def _refusal(
    weights: _Weights,
    describe: str,
    unexpected: list[str],
    mismatched: list[str],
    missing_backbone: list[str],
) -> str:
    lines = [f"pretrained={weights.source}: the checkpoint does not fit {describe}"]
    for title, keys in (
        ("checkpoint tensors the model has no place for", unexpected),
        ("shape mismatches", mismatched),
        ("backbone tensors the checkpoint lacks", missing_backbone),
    ):
        if keys:
            lines.append(f"- {title} ({len(keys)}): {_listed(keys)}")
    if any(part.endswith("attention") for k in unexpected for part in k.split(".")[:-1]):
        lines.append(
            "- the checkpoint holds attention modules: build the model with the attention "
            "(and options) it was trained with"
        )
    if weights.hint:
        lines.append(f"- {weights.hint}")
    else:
        lines.append(
            "- was it saved from another model, attention or options? Only the attention "
            "modules and the classifier may be left out of a pretrained checkpoint"
        )
    return "\n".join(lines)


def create_pretrained_model(
    name: str,
    pretrained: str | os.PathLike,
    num_classes: int | None = None,
    progress: bool = True,
    **create_kwargs: Any,
) -> nn.Module:
    """``create_model(name, ..., pretrained=pretrained)``: build the model, load the
    checkpoint's tensors under the rule in the module docstring, and attach the
    ``PretrainedReport`` as ``model.pretrained_report``. ``create_kwargs`` are
    ``create_model``'s other arguments (attention, attention_kwargs, model options).
    ``num_classes=None``: the checkpoint's class count (else the model's default)."""
    from .registry import NO_ATTENTION, attention_level, create_model, model_entrypoint

    model_entrypoint(name)  # an unknown name: ValueError listing the models
    named = set(inspect.signature(create_model).parameters)
    model_kwargs = {k: v for k, v in create_kwargs.items() if k not in named}
    weights = _read(pretrained, name, model_kwargs, progress)
    plain = _plain_model(name, None, model_kwargs)
    if num_classes is None:
        num_classes = classifier_classes(weights.state, classifier_prefix(plain))
    model = create_model(name, num_classes=num_classes, **create_kwargs)
    plain_keys = set(plain.state_dict())  # key names do not depend on the class count
    attention = create_kwargs.get("attention")
    describe = f"{name} with attention={attention!r}" if attention not in NO_ATTENTION else name
    if attention not in NO_ATTENTION and attention_level(attention) == "conv":
        describe += (
            f" (a conv-level attention: {attention!r} replaces the blocks' 3x3 convolutions, "
            "so their pretrained weights have no place in it)"
        )
    model.pretrained_report = _load(model, weights, plain_keys, describe)
    return model
