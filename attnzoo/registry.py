"""Name -> constructor registries for attention modules and models.

``create_attention(name, channels, **kwargs)`` and
``create_model(name, num_classes=10, attention=None, attention_kwargs=None, **kwargs)``
are the public entry points; modules and models register themselves with the
decorators below when their file is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_ATTENTIONS: dict[str, Callable[..., nn.Module]] = {}
_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Names that mean "no attention" wherever an attention name is accepted.
NO_ATTENTION = (None, "", "none")


def register_attention(name: str) -> Callable:
    def wrap(cls: Callable) -> Callable:
        if name in _ATTENTIONS:
            raise RuntimeError(f"attention {name!r} registered twice")
        _ATTENTIONS[name] = cls
        return cls

    return wrap


def register_model(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        if name in _MODELS:
            raise RuntimeError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_attentions() -> list[str]:
    """Sorted names of every registered attention module."""
    return sorted(_ATTENTIONS)


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


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
    valid = [p for p in params if p not in ("self", "channels")]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )


def _call_checked(kind: str, name: str, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
    _check_kwargs(kind, name, fn, kwargs)
    return fn(*args, **kwargs)


def attention_class(name: str) -> Callable[..., nn.Module]:
    """The registered class (or factory) behind an attention name."""
    return _lookup("attention", name, _ATTENTIONS)


def create_attention(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention module ``name`` for ``channels`` input channels.

    Raises ``ValueError`` for an unknown name (listing the valid ones), an unknown
    option, or an option value the module cannot take.
    """
    cls = attention_class(name)
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
    num_classes: int = 10,
    attention: str | None = None,
    attention_kwargs: dict | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` with ``attention`` (a registered name, or None) plugged in."""
    fn = _lookup("model", name, _MODELS)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_attention(attention, attention_kwargs)
    if attention in NO_ATTENTION:
        attention = None
    return _call_checked(
        "model",
        name,
        fn,
        num_classes=num_classes,
        attention=attention,
        attention_kwargs=dict(attention_kwargs or {}),
        **kwargs,
    )
