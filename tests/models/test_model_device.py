"""Every registered model, with attention plugged in, runs on any device.

As tests/attention/test_device.py for the modules: on the ``meta`` device no op of forward or
backward may return a tensor off the input's device (the dispatch mode ``OnlyOn`` records
any). Models are built on meta directly (``with torch.device("meta")``), so even resnet101
costs no weight initialisation: each case is a fraction of a second. Every model gets one
module-level attention (SE, in every block); resnet20 gets every registered attention, of
every level (module, block, conv and model). The ``device`` fixture then trains resnet20
with a few of them for one step on the CPU, and on CUDA where present.
"""

from __future__ import annotations

import pytest
import torch
from device_helpers import OnlyOn
from torch.utils._pytree import tree_flatten

import attnzoo
from attnzoo.train.loss import training_loss

META = torch.device("meta")
MODELS = attnzoo.list_models()
CASES = [(model, "se") for model in MODELS] + [
    ("resnet20", name) for name in [None, *attnzoo.list_attentions()] if name != "se"
]
pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("model", "attention"), CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_forward_and_backward_on_meta_make_no_cpu_tensor(model: str, attention: str | None):
    with torch.device("meta"):
        net = attnzoo.create_model(model, attention=attention).train()
    # 64 x 64 images: enough for the five stride-2 stages of the ImageNet models.
    x = torch.randn(2, 3, 64, 64, device=META, requires_grad=True)
    watch = OnlyOn(META)
    with watch:
        out = net(x)
        sum(t.float().sum() for t in _tensors(out)).backward()
    assert not watch.stray, f"{model} + {attention}: tensors made off the device: {watch.stray}"
    assert x.grad is not None and x.grad.device == META


@pytest.mark.parametrize("attention", [None, "se", "ham", "cbam", "rcca", "bridge", "sk", "abn"])
def test_one_training_step_on_the_device(attention: str | None, device: torch.device):
    torch.manual_seed(0)
    net = attnzoo.create_model("resnet20", attention=attention).train().to(device)
    x = torch.randn(4, 3, 16, 16, device=device)
    y = torch.tensor([0, 1, 2, 3], device=device)
    loss = training_loss(net(x), y)
    assert loss.device.type == device.type and torch.isfinite(loss)
    loss.backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert param.grad.device.type == device.type and torch.isfinite(param.grad).all(), name
