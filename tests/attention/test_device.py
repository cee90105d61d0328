"""Every registered attention runs on any device: no tensor made during forward or backward
may land on the CPU (or in float32) when the input lives elsewhere (or in another dtype).

On the ``meta`` device (no data, so every check here is cheap) a module computes only shapes
and dtypes, and the ``OnlyOn`` dispatch mode (tests/device_helpers.py) fails the test on any op whose result is
not a meta tensor: a ``torch.zeros(n)`` or ``torch.tensor(0.5)`` without ``device=``, which
works on the CPU and breaks (or, as a 0-dim tensor, silently computes on the CPU) on a GPU.
The same module in float64 and in bfloat16 (without autocast) must give an output of that
dtype: a float32 constant made during forward would promote it. The ``device`` fixture then
runs real forward + backward on the CPU and, on a GPU machine, on CUDA.

No registered module needs a data-dependent op (``.item()``, ``nonzero``) in forward, so
none is exempt from the meta check; a module that needs one must be listed here with the
reason, not skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from device_helpers import OnlyOn
from torch import nn
from torch.utils._pytree import tree_flatten

import attnzoo
from attnzoo.registry import attention_level, create_attention

META = torch.device("meta")
NAMES = attnzoo.list_attentions(level=("module", "block", "conv"))
CHANNELS = 16
# Options that reach other code paths than the defaults (an unknown name or option raises
# ValueError in ``create_attention``, so a renamed one fails here rather than testing nothing).
VARIANTS: dict[str, list[dict]] = {
    "bam": [{"combine": "product"}],
    "bridge": [{"earlier_channels": (16, 8)}],
    "cbam": [{"spatial": False}, {"adaptive": True}, {"max_pool": False}],
    "coord": [{"activation": "relu"}],
    "csm": [{"mode": "sam"}, {"order": "spatial_first", "qk_reduction": 8}],
    "danet_cam": [{"energy": "code"}],
    "danet_pam": [{"recompute": False}],
    "ese": [{"gate": "sigmoid"}],
    "fca": [{"frequencies": "low16"}],
    "gam": [{"pool": True, "groups": 4, "reduction": 4}],
    "gc": [{"pooling": "avg", "fusion": "mul"}],
    "gct": [{"mode": "l1"}],
    "ge": [{"variant": "theta", "extent": 2}, {"variant": "theta_plus", "feat_size": 8}],
    "ham": [{"spatial": "cbam"}, {"spatial": None, "adaptive": False}],
    "nonlocal": [{"subsample": True}],
    "polarized": [{"layout": "sequential"}],
    "scse": [{"combine": "max"}],
    "sk": [{"stride": 2}],
    "spatial_softmax": [{"residual": True, "scale_to_mean_one": False}],
    "triplet": [{"no_spatial": True}],
}
CASES = [(name, {}) for name in NAMES] + [
    (name, kwargs) for name, variants in sorted(VARIANTS.items()) for kwargs in variants
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in CASES]


def inputs(name: str, kwargs: dict, device: torch.device, dtype: torch.dtype) -> tuple:
    """(x, *extra): a (2, C, 8, 8) map, and the earlier outputs a block-level module reads."""
    x = torch.randn(2, CHANNELS, 8, 8, device=device, dtype=dtype, requires_grad=True)
    if attention_level(name) != "block":
        return (x,)
    earlier = [
        torch.randn(2, c, 8, 8, device=device, dtype=dtype)
        for c in kwargs.get("earlier_channels", ())
    ]
    return x, earlier


def build(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return create_attention(name, CHANNELS, **kwargs)


def outputs(out: object) -> Iterator[torch.Tensor]:
    yield from (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def test_variants_name_registered_attentions() -> None:
    assert set(VARIANTS) <= set(NAMES)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_and_backward_on_meta_make_no_cpu_tensor(name: str, kwargs: dict, mode: str):
    module = build(name, kwargs).train(mode == "train").to(META)
    args = inputs(name, kwargs, META, torch.float32)
    watch = OnlyOn(META)
    with watch:
        out = module(*args)
        sum(t.sum() for t in outputs(out)).backward()
    assert not watch.stray, f"{name}: tensors made off the input's device: {watch.stray}"
    assert args[0].grad is not None and args[0].grad.device == META


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_keeps_the_input_dtype_on_meta(name: str, kwargs: dict, dtype: torch.dtype):
    """The whole module in float64 (or bfloat16), no autocast: a float32 tensor made during
    forward would promote the output (or, for bfloat16, raise in a matmul)."""
    module = build(name, kwargs).train().to(META, dtype)
    args = inputs(name, kwargs, META, dtype)
    out = module(*args)
    assert {t.dtype for t in outputs(out)} == {dtype}
    sum(t.sum() for t in outputs(out)).backward()
    assert args[0].grad.dtype == dtype
    for param_name, param in module.named_parameters():
        assert param.grad is None or param.grad.dtype == dtype, param_name


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_on_the_device(name: str, device: torch.device, randomize):
    """Real values on ``device`` (the CPU; CUDA too where present): finite, on that device,
    and a gradient on that device for every parameter."""
    kwargs = VARIANTS["bridge"][0] if name == "bridge" else {}
    module = randomize(build(name, kwargs)).train().to(device)
    args = inputs(name, kwargs, device, torch.float32)
    out = module(*args)
    assert out.device.type == device.type and out.shape[:2] == args[0].shape[:2]
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert args[0].grad.device.type == device.type and torch.isfinite(args[0].grad).all()
    for param_name, param in module.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert param.grad.device.type == device.type and torch.isfinite(param.grad).all()
