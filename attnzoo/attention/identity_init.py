"""Function-preserving ("identity") initialisation of attention modules.

Adding a randomly initialised attention module to a *pretrained* network changes what the
network computes before any training: a sigmoid gate at init is about 0.5, so every
activation behind it is halved, and the pretrained features are disturbed. With
``create_model(..., attention_init="identity")`` (or ``graft(..., attention_init="identity")``)
every attention module starts as the identity map, so the network with attention computes
the same function as without it (to float rounding) at step 0, in eval *and* train mode, and
training moves away from there.

Two ways to get there, chosen per module (``init_identity_`` dispatches on the class):

- **exact**: the module has a form that reaches the identity with some parameter values, and
  those values keep a gradient path open. Those parameters are set in place; the module's
  class, its state_dict keys and its parameter count are unchanged.
- **blend**: the module cannot be the identity (a sigmoid gate never reaches exactly 1; a
  gate pinned near 1 by a large bias saturates and kills its own gradient). It is wrapped in
  ``IdentityBlend``: ``out = x + alpha * (attention(x) - x)`` with ``alpha`` a learnable
  scalar (one per module, 0-dim, like DANet's gamma) initialised to 0. Exact at step 0 for
  any module-level (C -> C) or block-level attention, and alpha's gradient is
  ``sum(dL/dout * (attention(x) - x))``, which is non-zero whenever the module does anything:
  after the first step alpha moves, and then the module's own parameters get gradients too.
  Cost: one parameter per module (16 on ResNet-50 with block placement). The module's keys
  move under ``module.`` (``layer1.0.attention.module.fc1.weight``) and ``alpha`` is added,
  so a checkpoint trained this way loads into a model built with the same
  ``attention_init``.

Per module (options not listed: their defaults):

==================  =========  ===================================================================
module              how        what is set / why it cannot be exact
==================  =========  ===================================================================
a2                  exact      ``out_conv`` = 0 (weight and bias): out = x + out_conv(Z)
danet_pam           exact      gamma = 0 (DANet's own init): x + gamma D S^T
danet_cam           exact      beta = 0 (DANet's own init)
rcca                exact      gamma = 0 (CCNet's own init), every recurrence is then x
gc                  exact      ``fusion="add"``: W_v2 = 0 (the paper's own init). ``fusion="mul"``:
                               blend (x sigmoid(0) = x / 2)
gct                 exact      gamma = beta = 0 (the paper's own init): gate 1 + tanh(0) = 1
nonlocal            exact      output BN scale and shift = 0: z = x + BN(...) = x, train mode too
                               (the paper's init sets the scale; the shift is 0 by default)
polarized           exact      ``layout="parallel"``: channel LayerNorm scale = shift = 0 and
                               spatial W_v = 0, so both gates are sigmoid(0) = 0.5 and
                               x (0.5 + 0.5) = x. ``"sequential"``: blend (x / 4)
scse                exact      ``combine="add"``: last channel FC and spatial conv = 0, so
                               x/2 + x/2 = x. ``combine="max"``: blend (max(x/2, x/2) = x/2)
spatial_softmax     exact      conv = 0: the softmax is uniform, 1/(HW) scaled by HW (1 up to one
                               rounding). With ``residual=True`` (2x) or without
                               ``scale_to_mean_one`` (x/HW): blend
csm                 blend      its channel step is an SE gate (sigmoid); ``mode="sam"`` (position
                               attention only) is exact with gamma = 0
bam                 blend      F (1 + M) with M = sigmoid(...) > 0: nothing makes M = 0
cbam, se, eca,      blend      x * sigmoid(.): a sigmoid reaches 1 only at +inf; a large bias
coord, ela, ema,               gives 1 - 1e-9 but a gradient of 1e-9 (the gate could not learn)
fca, gam, ge, sge,
srm, bridge
ese                 blend      hard sigmoid: 1 exactly for logits >= 3, but its gradient is 0
                               there, so the gate would never move
ham                 blend      sigmoid channel gate; spatial weights in [0.5, 1)
triplet             blend      mean of three sigmoid gates
shuffle             blend      sigmoid gates *and* a channel shuffle (a permutation of channels)
simam               blend      parameter-free sigmoid gate
sk, splat, epsa     no         conv level: they *replace* the block's 3x3 conv (and its BN), so the
                               plain network's conv has no counterpart in the new one. They are
                               not initialisable from it either: splat's grouped conv gives
                               each radix split only 1/R of the input channels; sk's second
                               branch is a dilated conv (no copy of a 3x3 kernel); an sk that
                               copies the conv into branch 1 (BN doubled) and zeroes branch 2 is
                               exact but leaves branch 2 at ReLU(0), whose gradient is 0
                               forever; epsa splits the output channels over 3x3 ... 9x9 convs
                               of different group counts. ``init_identity_`` raises.
bridge_head         exact      model level: the bridge W = [0 ... 0 | I] (the identity on the
                               last stage's descriptor), b = 0, so logits = FC(GAP(X_S))
abn                 no         model level: the perception branch reads (1 + M) g(x) with
                               M = sigmoid(...) > 0 everywhere, and in training the model
                               returns a second (attention-branch) output. Raises.
==================  =========  ===================================================================

``tests/attention/test_identity_init.py`` checks every registered attention on resnet20 and
a Bottleneck ResNet-50 (plain weights copied into the attention model, logits equal within
1e-5 of their scale, eval and train mode) and that the modules learn after one SGD step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..registry import attention_class, list_attentions
from .a2 import DoubleAttention
from .abn import AttentionBranchNetwork
from .bridge_head import BridgeHead
from .csm import CSM
from .danet import ChannelAttention, PositionAttention
from .epsa import PyramidSplitAttention
from .gc import GlobalContextBlock
from .gct import GatedChannelTransformation
from .non_local import NonLocalBlock
from .polarized import PolarizedSelfAttention
from .rcca import RecurrentCrissCrossAttention
from .scse import ConcurrentSpatialChannelSE
from .sk import SelectiveKernel
from .spatial_softmax import SpatialSoftmaxAttention
from .splat import SplitAttentionConv

__all__ = [
    "ATTENTION_INITS",
    "IdentityBlend",
    "NotPreservableError",
    "apply_identity_init",
    "check_attention_init",
    "identity_init",
    "init_identity_",
]

ATTENTION_INITS = ("default", "identity")
EXACT, BLEND = "exact", "blend"


class NotPreservableError(ValueError):
    """An attention that no initialisation turns into the identity (conv level, abn)."""


def check_attention_init(attention_init: str, attention: str | None = None) -> str:
    """Raise ``ValueError`` for an unknown ``attention_init``, and ``NotPreservableError``
    (before anything is built) for ``"identity"`` with an attention that has none."""
    if attention_init not in ATTENTION_INITS:
        raise ValueError(
            f"unknown attention_init {attention_init!r}; choose one of: {', '.join(ATTENTION_INITS)}"
        )
    if attention_init == "identity" and attention is not None:
        cls = attention_class(attention)
        if cls in _NOT_PRESERVABLE:
            raise NotPreservableError(_not_preservable_message(attention, cls))
    return attention_init


class IdentityBlend(nn.Module):
    """``x + alpha * (module(x) - x)``, alpha a learnable scalar initialised to 0.

    Makes any C -> C attention start as the identity (exactly: 0 times a finite number is 0)
    while alpha still gets a gradient. A block-level module (``reads_earlier``) gets the
    block's earlier outputs passed through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.alpha = nn.Parameter(torch.zeros(()))
        self.reads_earlier = getattr(module, "reads_earlier", False)

    def forward(self, x: torch.Tensor, *args: Sequence[torch.Tensor]) -> torch.Tensor:
        attended = self.module(x, *args)
        return x + self.alpha.to(x.dtype) * (attended - x)


# --- the exact initialisations, one per class ----------------------------------------------
# Each sets the module in place and returns True, or returns False where the module's options
# give it a form that cannot be the identity (then it is blended).


def _zero_(*tensors: torch.Tensor | None) -> None:
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                t.zero_()


def _a2(m: DoubleAttention) -> bool:
    _zero_(m.out_conv.weight, m.out_conv.bias)
    return True


def _gamma(m: PositionAttention | RecurrentCrissCrossAttention) -> bool:
    _zero_(m.gamma)
    return True


def _cam(m: ChannelAttention) -> bool:
    _zero_(m.beta)
    return True


def _gc(m: GlobalContextBlock) -> bool:
    if m.fusion != "add":
        return False
    _zero_(m.transform[-1].weight, m.transform[-1].bias)
    return True


def _gct(m: GatedChannelTransformation) -> bool:
    _zero_(m.gamma, m.beta)
    return True


def _nonlocal(m: NonLocalBlock) -> bool:
    _zero_(m.out_bn.weight, m.out_bn.bias)
    return True


def _polarized(m: PolarizedSelfAttention) -> bool:
    if m.layout != "parallel":
        return False
    _zero_(m.channel_norm.weight, m.channel_norm.bias, m.spatial_value.weight)
    return True


def _scse(m: ConcurrentSpatialChannelSE) -> bool:
    if m.combine != "add":
        return False
    _zero_(m.channel_fc2.weight, m.channel_fc2.bias, m.spatial_conv.weight, m.spatial_conv.bias)
    return True


def _spatial_softmax(m: SpatialSoftmaxAttention) -> bool:
    if m.residual or not m.scale_to_mean_one:
        return False
    _zero_(m.conv.weight)
    return True


def _csm(m: CSM) -> bool:
    if m.channel is not None:  # an SE gate: sigmoid
        return False
    return _gamma(m.spatial)


def _bridge_head(m: BridgeHead) -> bool:
    last = m.bridge.out_features
    with torch.no_grad():
        m.bridge.weight.zero_()
        weight = m.bridge.weight
        weight[:, -last:].copy_(torch.eye(last, dtype=weight.dtype, device=weight.device))
        m.bridge.bias.zero_()
    return True


_EXACT: dict[type, Callable[[nn.Module], bool]] = {
    DoubleAttention: _a2,
    PositionAttention: _gamma,
    ChannelAttention: _cam,
    RecurrentCrissCrossAttention: _gamma,
    GlobalContextBlock: _gc,
    GatedChannelTransformation: _gct,
    NonLocalBlock: _nonlocal,
    PolarizedSelfAttention: _polarized,
    ConcurrentSpatialChannelSE: _scse,
    SpatialSoftmaxAttention: _spatial_softmax,
    CSM: _csm,
    BridgeHead: _bridge_head,
}

_CONV_LEVEL_REASON = (
    "it replaces the block's 3x3 conv (and its BN), so the plain network's conv has no "
    "counterpart in it and no initialisation reproduces that conv (see "
    "attnzoo/attention/identity_init.py)"
)
_NOT_PRESERVABLE: dict[type, str] = {
    SelectiveKernel: _CONV_LEVEL_REASON,
    SplitAttentionConv: _CONV_LEVEL_REASON,
    PyramidSplitAttention: _CONV_LEVEL_REASON,
    AttentionBranchNetwork: (
        "its perception branch reads (1 + M) g(x) with M = sigmoid(...) > 0 everywhere, and "
        "in training it returns a second (attention-branch) output"
    ),
}


def _not_preservable_message(name: str, cls: type) -> str:
    return (
        f"attention {name!r} cannot start as the plain network (attention_init='identity'): "
        f"{_NOT_PRESERVABLE[cls]}; use attention_init='default'"
    )


def _registered_name(module: nn.Module) -> str:
    for name in list_attentions():
        if type(module) is attention_class(name):
            return name
    return type(module).__name__


def init_identity_(module: nn.Module) -> bool:
    """Set ``module`` in place so that it computes the identity, where its form allows it.

    Returns True if it now does (exactly, to float rounding), False if it cannot by its own
    parameters (a sigmoid gate: wrap it in ``IdentityBlend``, or use ``identity_init``).
    Raises ``NotPreservableError`` for the attentions no initialisation makes the identity
    (conv level: sk, splat, epsa; model level: abn)."""
    if type(module) in _NOT_PRESERVABLE:
        raise NotPreservableError(_not_preservable_message(_registered_name(module), type(module)))
    exact = _EXACT.get(type(module))
    return exact(module) if exact is not None else False


def identity_init(module: nn.Module) -> tuple[nn.Module, str]:
    """``(module, "exact")`` set in place, or ``(IdentityBlend(module), "blend")``: a module
    that computes the identity at init either way. Raises as ``init_identity_``."""
    if init_identity_(module):
        return module, EXACT
    return IdentityBlend(module), BLEND


def _attention_classes() -> tuple[type, ...]:
    classes = (attention_class(name) for name in list_attentions())
    return tuple(c for c in classes if isinstance(c, type))


def apply_identity_init(model: nn.Module) -> list[tuple[str, str]]:
    """Give every attention module in ``model`` (the outermost registered attention classes;
    ``model`` itself if it is one, as a model-level attention is) its identity init, wrapping
    the sigmoid gates in ``IdentityBlend`` in place. Returns ``[(qualified name, "exact" or
    "blend"), ...]``. Raises ``NotPreservableError`` (naming the module) where one cannot be.
    Applying it twice gives the same model (an ``IdentityBlend`` gets alpha = 0 again)."""
    classes = _attention_classes()
    done: list[tuple[str, str]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            qualified = f"{prefix}{child_name}"
            if isinstance(child, IdentityBlend):  # applied before: start it over
                _zero_(child.alpha)
                done.append((qualified, BLEND))
            elif isinstance(child, classes):
                new, how = identity_init(child)
                if new is not child:
                    setattr(parent, child_name, new)
                done.append((qualified, how))
            else:
                visit(child, qualified + ".")

    if isinstance(model, classes):
        if not init_identity_(model):
            raise NotPreservableError(
                f"{_registered_name(model)!r} wraps the whole network and has no identity init"
            )
        done.append(("", EXACT))
        # a model-level attention also holds the backbone; its own modules stay as built
    visit(model, "")
    return done
