"""Name -> constructor registries for attention modules and models.

``create_attention(name, channels, **kwargs)`` and
``create_model(name, num_classes=None, attention=None, attention_kwargs=None, **kwargs)``
(``num_classes=None``: the model's own default, 10 for CIFAR models, 1000 for ImageNet ones)
are the public entry points; modules and models register themselves with the
decorators below when their file is imported.

Every attention has a *level*, which says how a backbone plugs it in:

- ``"module"``: a drop-in C -> C module, ``module(x)``; a backbone places it per block,
  per stage or once at the end (the model's ``placement`` option).
- ``"block"``: also C -> C, but it reads the block's earlier intermediate outputs too,
  ``module(x, earlier)`` (bridge attention). Built with ``earlier_channels``; it only goes
  inside residual blocks.
- ``"conv"``: it replaces a block's 3x3 convolution (selective kernel), built as
  ``cls(in_channels, out_channels, stride=..., groups=...)``; only the ResNets take it, in
  every block. ``create_attention(name, C)`` builds it C -> C at stride 1.
- ``"model"``: it changes the network around the backbone (ABN's attention branch, the
  seed-002 bridge head). Registered as ``cls(backbone, **kwargs)``; ``create_model`` builds
  the plain backbone and wraps it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from torch import nn

_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {}
_LEVELS: dict[str, str] = {}
_PLACEMENTS: dict[str, str] = {}  # where a backbone puts the module unless told otherwise
ATTENTION_LEVELS = ("module", "block", "conv", "model")
_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Names that mean "no attention" wherever an attention name is accepted.
NO_ATTENTION = (None, "", "none")


def register_attention(name: str, level: str = "module", placement: str = "block") -> Callable:
    """Register an attention class under ``name``. ``placement`` is where its paper puts it
    in a network ("block": every residual block; "stage": each stage boundary, as BAM;
    "final": once on the last map): the backbones' default for it."""
    if level not in ATTENTION_LEVELS:
        raise ValueError(f"unknown attention level {level!r}; choose one of: {ATTENTION_LEVELS}")
    if placement not in ("block", "stage", "final"):
        raise ValueError(f"unknown placement {placement!r}; choose one of: block, stage, final")

    def wrap(cls: Callable) -> Callable:
        if name in _ATTENTIONS:
            raise RuntimeError(f"attention {name!r} registered twice")
        _ATTENTIONS[name] = cls
        _LEVELS[name] = level
        _PLACEMENTS[name] = placement
        return cls

    return wrap


def register_model(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        if name in _MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_attentions(level: str | tuple[str, ...] | None = None) -> list[str]:
    """Sorted names of every registered attention, or of those at ``level`` (one or several)."""
    if level is None:
        return sorted(_ATTENTIONS)
    levels = (level,) if isinstance(level, str) else tuple(level)
    for lv in levels:
        if lv not in ATTENTION_LEVELS:
            raise ValueError(f"unknown attention level {lv!r}; choose one of: {ATTENTION_LEVELS}")
    return sorted(n for n in _ATTENTIONS if _LEVELS[n] in levels)


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function registered as model ``name`` (ValueError listing the models if none)."""
    return _lookup("model", name, _MODELS)


def _lookup(kind: str, name: str, table: dict) -> Callable:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def _check_kwargs(kind: str, name: str, fn: Callable, kwargs: dict) -> None:
    """Raise ValueError naming the valid options if ``fn`` does not take every key."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"options for {kind} {name!r} must be a mapping, got {kwargs!r}")
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in ("self", "channels", "backbone")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )


def _call_checked(kind: str, name: str, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
    _check_kwargs(kind, name, fn, kwargs)
    return fn(*args, **kwargs)


def default_num_classes(name: str) -> int:
    """The class count model ``name`` is built with when none is given (its constructor's
    default: 10 for the CIFAR models, 1000 for the ImageNet ones)."""
    param = inspect.signature(_lookup("model", name, _MODELS)).parameters.get("num_classes")
    if param is None or not isinstance(param.default, int):
        raise RuntimeError(f"model {name!r} has no default num_classes")
    return param.default


def attention_class(name: str) -> Callable[..., nn.Module]:
    """The registered class (or factory) behind an attention name."""
    return _lookup("attention", name, _ATTENTIONS)


def default_placement(name: str | None) -> str:
    """Where a backbone puts attention ``name`` when no ``placement`` is given: where its
    paper puts it ("block" for most; "stage" for BAM)."""
    if name in NO_ATTENTION:
        return "block"
    attention_class(name)
    return _PLACEMENTS[name]


def attention_level(name: str) -> str:
    """``"module"``, ``"block"`` or ``"model"``: how a backbone plugs ``name`` in."""
    attention_class(name)
    return _LEVELS[name]


def create_attention(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention module ``name`` for ``channels`` input channels.

    Raises ``ValueError`` for an unknown name (listing the valid ones), an unknown
    option, an option value the module cannot take, or a model-level attention (those
    wrap a whole network: build them with ``create_model(..., attention=name)``).
    """
    cls = attention_class(name)
    if _LEVELS[name] == "model":
        raise ValueError(
            f"attention {name!r} changes the whole network, not one feature map; "
            f"build it with create_model(<model>, attention={name!r})"
        )
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return _call_checked("attention", name, cls, channels, **kwargs)


def check_attention(attention: str | None, attention_kwargs: dict | None = None) -> None:
    """Validate an attention name and options without a channel count (for configs)."""
    if attention in NO_ATTENTION:
        if attention_kwargs:
            raise ValueError("attention_kwargs given but no attention selected")
        return
    _check_kwargs("attention", attention, attention_class(attention), attention_kwargs or {})


def create_model(
    name: str,
    num_classes: int | None = None,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    attention_init: str = "default",
    pretrained: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` with ``attention`` (a registered name, or None) plugged in.

    ``num_classes`` defaults to the model's natural value (``default_num_classes``): 10 for
    the CIFAR models, 1000 for the ImageNet ones, as in timm and torchvision.
    ``attention_init="identity"`` starts every attention module as the identity, so the model
    computes what the plain one does (for pretrained weights; per module in
    ``attention/identity_init.py``); ``"default"`` keeps each module's own init.
    ``pretrained``: ``"torchvision"``, ``"timm:<name>"``, a state_dict file or an ``attnzoo
    export`` directory; the backbone loads from it and the attention modules start as
    initialised (``pretrained.py``; ``model.pretrained_report`` says what was loaded)."""
    if pretrained is not None:
        from .pretrained import create_pretrained_model

        return create_pretrained_model(
            name,
            pretrained,
            num_classes=num_classes,
            attention=attention,
            attention_kwargs=attention_kwargs,
            attention_init=attention_init,
            **kwargs,
        )
    fn = _lookup("model", name, _MODELS)
    if num_classes is None:
        num_classes = default_num_classes(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_attention(attention, attention_kwargs)
    if attention in NO_ATTENTION:
        attention = None
    from .attention.identity_init import apply_identity_init, check_attention_init

    check_attention_init(attention_init, attention)
    if attention is not None and _LEVELS[attention] == "model":
        if "placement" in kwargs:
            raise ValueError(
                f"placement does not apply to {attention!r}: it is a model-level attention"
            )
        backbone = _call_checked(
            "model",
            name,
            fn,
            num_classes=num_classes,
            attention=None,
            attention_kwargs={},
            **kwargs,
        )
        model = _call_checked(
            "attention", attention, _ATTENTIONS[attention], backbone, **(attention_kwargs or {})
        )
    else:
        model = _call_checked(
            "model",
            name,
            fn,
            num_classes=num_classes,
            attention=attention,
            attention_kwargs=dict(attention_kwargs or {}),
            **kwargs,
        )
    if attention_init == "identity":
        apply_identity_init(model)
    return model
