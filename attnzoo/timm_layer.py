"""attnzoo attention modules as timm ``attn_layer`` arguments.

timm's ResNet blocks build their attention with ``create_attn(attn_layer, channels, **dd)``
(``timm/layers/create_attn.py``): any callable that is not a string, bool or module is
called as ``attn_layer(channels, device=..., dtype=...)`` and the result is applied to the
block's last BN output, before the addition with the shortcut (``block.se``). So::

    import timm, attnzoo
    model = timm.create_model(
        "resnet50", block_args=dict(attn_layer=attnzoo.timm_layer("ham", separation_rate=0.5))
    )

``timm_layer(name, **options)`` checks the name and options at once and returns a
``TimmAttentionLayer``: a small picklable, deep-copyable callable with a readable repr.

What it accepts:

- Only module-level attentions (``attnzoo.list_attentions(level="module")``): they map a
  feature map to one of the same shape, which is all a timm block asks of ``attn_layer``.
  Block-level ones (bridge) read the block's intermediate outputs, conv-level ones (sk,
  splat, epsa) replace the block's 3x3 conv and model-level ones (abn, bridge_head) wrap the
  whole network; timm's blocks offer none of that, so those names are refused with a
  pointer to ``attnzoo.create_model``.
- Attentions whose paper places them at stage boundaries (bam, a2, nonlocal) are accepted,
  but timm puts ``attn_layer`` in every block; use attnzoo's ResNets
  (``placement="stage"``) for the paper's placement.

Keywords timm's blocks pass (resnet, res2net, sknet, nfnet: ``device``, ``dtype``;
cspnet, efficientnet: also ``act_layer``; efficientnet: ``rd_ratio``):

- ``device``, ``dtype``: the module is built, then moved/cast with ``.to(device, dtype)``.
- ``rd_ratio`` (timm's hidden width as a fraction of the channels): becomes
  ``reduction = 1 / rd_ratio`` for modules that have a ``reduction``. An explicit
  ``reduction`` given to ``timm_layer`` wins over the block's ``rd_ratio``. Rounding of the
  hidden width stays the module's own (se: ``floor`` unless ``rd_rule="round8"``, timm's
  rule). Modules without a reduction raise ``TypeError`` (so timm's EfficientNet builder,
  which probes ``attn_layer(8, rd_ratio=1.0)`` for ``TypeError``, falls back to not
  passing it).
- ``act_layer`` (the block's activation): ignored. attnzoo's modules keep the activations
  their papers specify (coord's h-swish, SE's ReLU), whatever the host block uses.
- Any other keyword the module takes by name is passed on (an option given to
  ``timm_layer`` wins); anything else raises ``TypeError`` naming the module's options.

Initialisation: timm's ``ResNet.init_weights`` re-initialises every ``nn.Conv2d`` in the
model (Kaiming normal, fan-out), attention convs included, as it does for timm's own
attention layers. Modules whose paper fixes another init lose it there: gc's zero-initialised
last conv (which makes the block start as the plain ResNet block) is the one case.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .registry import (
    NO_ATTENTION,
    attention_class,
    attention_level,
    check_attention,
    create_attention,
    list_attentions,
)

# How to build each non-module level instead, for the error message.
_OTHER_LEVELS = {
    "block": "it reads the block's intermediate outputs, which timm's blocks do not pass",
    "conv": "it replaces the block's 3x3 convolution; timm's blocks only take a module "
    "applied after the last BN",
    "model": "it changes the network around the backbone, not one block",
}
# Keywords timm's blocks pass that are handled here rather than given to the module.
_IGNORED = ("act_layer",)


class TimmAttentionLayer:
    """``attn_layer`` for timm: ``layer(channels, **timm_kwargs)`` builds attnzoo's ``name``.

    Build it with ``attnzoo.timm_layer``; see this module's docstring for the keywords.
    """

    def __init__(self, name: str, **options: Any) -> None:
        if name in NO_ATTENTION:
            raise ValueError(
                f"timm_layer needs an attention name, got {name!r}; for no attention give "
                "timm attn_layer=None"
            )
        level = attention_level(name)  # raises for an unknown name, listing the valid ones
        if level != "module":
            raise ValueError(
                f"attention {name!r} is {level}-level: {_OTHER_LEVELS[level]}. Build it "
                f"with attnzoo.create_model('resnet50', attention={name!r}) instead; "
                f"module-level attentions for timm: {', '.join(list_attentions(level='module'))}"
            )
        check_attention(name, options)
        self.name = name
        self.options = dict(options)

    def _parameters(self) -> tuple[str, ...] | None:
        """The module's option names, or None when it takes any keyword."""
        params = inspect.signature(attention_class(self.name)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        return tuple(p for p in params if p not in ("self", "channels"))

    def __call__(
        self,
        channels: int,
        *,
        rd_ratio: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **timm_kwargs: Any,
    ) -> nn.Module:
        accepted = self._parameters()
        kwargs = {k: v for k, v in timm_kwargs.items() if k not in _IGNORED}
        unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
        if unknown:
            raise TypeError(
                f"attention {self.name!r} got unknown option(s) {', '.join(unknown)} from the "
                f"timm block; it takes: {', '.join(accepted) or '(none)'}"
            )
        if rd_ratio is not None:
            if accepted is not None and "reduction" not in accepted:
                raise TypeError(
                    f"attention {self.name!r} has no reduction, so it cannot take timm's "
                    f"rd_ratio={rd_ratio!r}; use an attention with one (se, cbam, coord, gc, ...)"
                )
            if isinstance(rd_ratio, bool) or not isinstance(rd_ratio, int | float) or rd_ratio <= 0:
                raise ValueError(f"rd_ratio must be a positive number, got {rd_ratio!r}")
            kwargs["reduction"] = 1.0 / rd_ratio
        kwargs.update(self.options)  # options given to timm_layer win
        module = create_attention(self.name, channels, **kwargs)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        return module

    def __repr__(self) -> str:
        args = [repr(self.name)] + [f"{k}={v!r}" for k, v in self.options.items()]
        return f"timm_layer({', '.join(args)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TimmAttentionLayer):
            return NotImplemented
        return (self.name, self.options) == (other.name, other.options)

    __hash__ = None  # type: ignore[assignment]  # options may hold unhashable values


def timm_layer(name: str, **options: Any) -> TimmAttentionLayer:
    """attnzoo's module-level attention ``name`` (with ``options``, as for
    ``create_attention``) as a timm ``attn_layer``:
    ``timm.create_model("resnet50", block_args=dict(attn_layer=timm_layer("ham")))``.

    Raises ``ValueError`` for an unknown name or option, or an attention that is not
    module-level (block, conv and model level ones need attnzoo's own backbones).
    """
    return TimmAttentionLayer(name, **options)
