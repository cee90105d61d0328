"""Identity ("function-preserving") initialisation (attnzoo/attention/identity_init.py).

Parametrised over every registered attention: a network built with attention and
``attention_init="identity"``, given the weights of the plain network, computes the plain
network's logits (eval and train mode), and its attention modules still learn.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.attention.identity_init import (
    IdentityBlend,
    NotPreservableError,
    apply_identity_init,
    identity_init,
    init_identity_,
)
from attnzoo.registry import attention_level, create_attention
from attnzoo.utils.random_weights import randomize_

NAMES = attnzoo.list_attentions()
NOT_PRESERVABLE = {"sk", "splat", "epsa", "abn"}  # conv level, and abn (see the docstring)
PRESERVED = [n for n in NAMES if n not in NOT_PRESERVABLE]
# The modules whose own parameters reach the identity with their default options; every
# other preservable one is wrapped in IdentityBlend.
EXACT = {
    "a2", "danet_cam", "danet_pam", "gc", "gct", "nonlocal", "polarized", "rcca", "scse",
    "spatial_softmax", "bridge_head",
}  # fmt: skip
# max |logits - plain logits| / max |plain logits|. Measured: 0 (bitwise equal) for every
# module on both networks; the bound leaves room for other kernels' rounding.
TOLERANCE = 1e-5
NETWORKS = {"resnet20": {}, "resnet50": {}}  # resnet50: the Bottleneck blocks, at 32 x 32


def test_every_attention_is_classified() -> None:
    assert NOT_PRESERVABLE <= set(NAMES)
    assert EXACT <= set(NAMES)
    assert {n for n in NAMES if attention_level(n) == "conv"} <= NOT_PRESERVABLE


@pytest.fixture(scope="module")
def plain() -> dict[str, tuple[dict, torch.Tensor]]:
    """Per network: random plain weights (a stand-in for pretrained ones) and an input."""
    out = {}
    for i, net in enumerate(NETWORKS):
        torch.manual_seed(i)
        model = randomize_(attnzoo.create_model(net, num_classes=10))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        out[net] = (state, torch.randn(2, 3, 32, 32))
    return out


def _logits(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    with torch.no_grad():
        y = model.train(train)(x)
    return y[0] if isinstance(y, tuple) else y


def _attention_keys(keys: list[str]) -> list[str]:
    """Keys that belong to an attention module (or bridge_head's bridge)."""
    return [
        k
        for k in keys
        if k.startswith("bridge.") or any(p.endswith("attention") for p in k.split("."))
    ]


@pytest.mark.parametrize("net", NETWORKS)
@pytest.mark.parametrize("name", PRESERVED)
def test_identity_init_preserves_the_plain_network(name: str, net: str, plain) -> None:
    state, x = plain[net]
    torch.manual_seed(1)
    model = attnzoo.create_model(net, num_classes=10, attention=name, attention_init="identity")
    target = model.backbone if attention_level(name) == "model" else model
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert unexpected == []
    assert missing == _attention_keys(missing)
    reference = attnzoo.create_model(net, num_classes=10)
    reference.load_state_dict(state)
    for train in (False, True):
        expected = _logits(reference, x, train)
        got = _logits(model, x, train)
        error = (got - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCE, f"{name} on {net}, train={train}: relative error {error:.3g}"


@pytest.mark.parametrize("name", PRESERVED)
def test_default_init_does_not_preserve(name: str, plain) -> None:
    """The check above can fail: modules that are not the identity by their own default init
    change the logits (so the test would see a wrong identity init)."""
    state, x = plain["resnet20"]
    torch.manual_seed(1)
    model = attnzoo.create_model("resnet20", attention=name)
    (model.backbone if attention_level(name) == "model" else model).load_state_dict(
        state, strict=False
    )
    reference = attnzoo.create_model("resnet20")
    reference.load_state_dict(state)
    expected, got = _logits(reference, x, False), _logits(model, x, False)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if name in {"danet_cam", "danet_pam", "gc", "gct", "nonlocal", "rcca"}:
        assert error <= TOLERANCE  # their papers already start them as the identity
    else:
        assert error > 1e-2


@pytest.mark.parametrize("name", PRESERVED)
def test_exact_or_blend_as_documented(name: str) -> None:
    model = attnzoo.create_model("resnet20", attention=name)
    report = apply_identity_init(model)
    assert report, f"no attention module found for {name}"
    methods = {how for _, how in report}
    assert methods == {"exact" if name in EXACT else "blend"}
    blends = [m for m in model.modules() if isinstance(m, IdentityBlend)]
    assert len(blends) == (0 if name in EXACT else len(report))


@pytest.mark.parametrize("name", sorted(NOT_PRESERVABLE))
def test_not_preservable_raises(name: str) -> None:
    with pytest.raises(NotPreservableError, match=f"{name!r} cannot start as the plain"):
        attnzoo.create_model("resnet20", attention=name, attention_init="identity")
    if attention_level(name) == "conv":
        with pytest.raises(NotPreservableError, match="3x3 conv"):
            init_identity_(create_attention(name, 16))


def test_unknown_attention_init() -> None:
    with pytest.raises(ValueError, match="unknown attention_init 'zero'; choose one of: default"):
        attnzoo.create_model("resnet20", attention="se", attention_init="zero")


def test_default_keeps_todays_init() -> None:
    torch.manual_seed(0)
    a = attnzoo.create_model("resnet20", attention="cbam").state_dict()
    torch.manual_seed(0)
    b = attnzoo.create_model("resnet20", attention="cbam", attention_init="default").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# Options that change which way a module goes.
OPTIONS = [
    ("gc", {"fusion": "mul"}, "blend"),
    ("polarized", {"layout": "sequential"}, "blend"),
    ("scse", {"combine": "max"}, "blend"),
    ("spatial_softmax", {"residual": True}, "blend"),
    ("spatial_softmax", {"scale_to_mean_one": False}, "blend"),
    ("csm", {"mode": "sam"}, "exact"),
    ("csm", {"mode": "cam"}, "blend"),
    ("gct", {"mode": "l1"}, "exact"),
    ("nonlocal", {"subsample": True}, "exact"),
]
MODULE_NAMES = attnzoo.list_attentions(level=("module", "block"))


@pytest.mark.parametrize(
    ("name", "kwargs", "how"),
    [(n, {}, "exact" if n in EXACT else "blend") for n in MODULE_NAMES] + OPTIONS,
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()),
)
def test_module_is_identity(name: str, kwargs: dict, how: str) -> None:
    torch.manual_seed(0)
    module = create_attention(name, 32, **kwargs)
    randomize_(module)  # whatever the weights were, the identity init overrides them
    module, got = identity_init(module)
    assert got == how
    x = torch.randn(2, 32, 7, 5)
    earlier = [torch.randn(2, 16, 7, 5)] if getattr(module, "reads_earlier", False) else []
    if earlier:
        module = identity_init(create_attention(name, 32, earlier_channels=(16,)))[0]
    for train in (False, True):
        with torch.no_grad():
            y = module.train(train)(x, *([earlier] if earlier else []))
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


def test_blend_parameter_cost() -> None:
    se = create_attention("se", 64)
    blended, how = identity_init(se)
    assert how == "blend"
    assert (
        sum(p.numel() for p in blended.parameters()) == sum(p.numel() for p in se.parameters()) + 1
    )
    assert blended.alpha.shape == ()


def _attention_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """max |gradient| of every attention parameter for one cross-entropy backward."""
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y).backward()
    return {
        n: (0.0 if p.grad is None else p.grad.abs().max().item())
        for n, p in model.named_parameters()
        if _attention_keys([n])
    }


@pytest.mark.parametrize("name", PRESERVED)
def test_attention_learns_after_one_step(name: str, zero_gradients) -> None:
    """The identity init does not stop learning. At step 0 some attention parameter gets a
    gradient (alpha, or the zeroed layer); after one SGD step every attention parameter does
    that gets one with the default init and the same weights, except those that never get
    one by construction (tests/attention/conftest.py; with random weights a ReLU unit can be
    dead for the whole batch, in both inits alike)."""
    torch.manual_seed(0)
    model = randomize_(attnzoo.create_model("resnet20", attention=name).double()).train()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    learning = {n for n, g in _attention_grads(copy.deepcopy(model), x, y).items() if g > 0}
    apply_identity_init(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _attention_grads(model, x, y)
    assert max(first.values()) > 0, f"{name}: no attention gradient at step 0"
    optimizer.step()
    second = _attention_grads(model, x, y)
    zero = zero_gradients(name, True)
    dead = [
        n
        for n, g in second.items()
        if g == 0
        and n.replace(".module.", ".") in learning
        and not any(n.endswith(z) for z in zero)
    ]
    assert len(second) >= len(learning)
    assert not dead, f"{name}: no gradient after one step for {dead}"
