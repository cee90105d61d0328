"""Every registered attention, at every level and placement it allows, inside a model.

Parametrised over ``attnzoo.list_attentions()``: a new module is covered without editing
this file. One real training step each (SGD on the summed loss the training loop uses).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.models.backbone import PLACEMENTS
from attnzoo.registry import attention_level
from attnzoo.train.loss import main_logits, training_loss

CASES = [(None, "block")] + [
    (name, placement)
    for name in attnzoo.list_attentions()
    for placement in (PLACEMENTS if attention_level(name) == "module" else ("block",))
]


def _build(name, placement):
    kwargs = {} if attention_level(name or "se") == "model" else {"placement": placement}
    return attnzoo.create_model("resnet20", attention=name, **kwargs)


@pytest.mark.parametrize(("name", "placement"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_one_training_step(name, placement):
    torch.manual_seed(0)
    model = _build(name, placement).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x)
    assert main_logits(out).shape == (4, 10)
    loss = training_loss(out, y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    opt.step()
    moved = {k for k, p in model.named_parameters() if not torch.equal(p, before[k])}
    # Everything outside the attention modules moves (for model-level attention, its
    # branch too). Inside them some weights may legitimately wait: a zero-initialised gate
    # (DANet's gamma) hides the branch behind it for the first step.
    backbone = {k for k in before if "attention." not in k}
    assert backbone <= moved, sorted(backbone - moved)
    attention = set(before) - backbone
    assert not attention or attention & moved
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("name", attnzoo.list_attentions(level=("module", "block")))
def test_batch_of_one_trains(name):
    """A training batch of one sample must not crash (BatchNorm1d in bridge, BAM, ...)."""
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention=name).train()
    training_loss(model(torch.randn(1, 3, 32, 32)), torch.tensor([3])).backward()


def test_placement_stage_and_final():
    model = attnzoo.create_model("resnet20", attention="bam", placement="stage")
    assert [m.channels for m in model.stage_attention] == [16, 32]
    assert model.final_attention is None
    assert not [
        m
        for m in model.modules()
        if type(m).__name__ == "BAM" and m not in list(model.stage_attention)
    ]
    model = attnzoo.create_model("resnet20", attention="spatial_softmax", placement="final")
    assert model.final_attention.channels == 64 and model.stage_attention is None
    blocks = [b for b in model.modules() if isinstance(b, attnzoo.models.BasicBlock)]
    assert all(isinstance(b.attention, torch.nn.Identity) for b in blocks)


def test_stage_attention_applies_after_each_stage_but_the_last():
    """A stage module that doubles its input doubles what the next stage sees."""
    torch.manual_seed(0)
    plain = attnzoo.create_model("resnet20").eval()
    placed = attnzoo.create_model("resnet20", attention="se", placement="stage").eval()
    placed.load_state_dict(plain.state_dict(), strict=False)
    for m in placed.stage_attention:
        m.forward = lambda t: 2 * t
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = plain.forward_stem(x)
        h = plain.layer3(2 * plain.layer2(2 * plain.layer1(h)))
        torch.testing.assert_close(placed(x), plain.forward_head(h))


def test_placement_errors():
    with pytest.raises(ValueError, match="unknown placement 'everywhere'; choose one of: block"):
        attnzoo.create_model("resnet20", attention="se", placement="everywhere")
    with pytest.raises(ValueError, match="only goes in blocks"):
        attnzoo.create_model("resnet20", attention="bridge", placement="stage")
    with pytest.raises(ValueError, match="placement does not apply to 'abn'"):
        attnzoo.create_model("resnet20", attention="abn", placement="final")
    with pytest.raises(ValueError, match="set by the backbone"):
        attnzoo.create_model(
            "resnet20", attention="bridge", attention_kwargs={"earlier_channels": [16]}
        )


def test_model_level_attention_is_not_a_drop_in_module():
    with pytest.raises(ValueError, match=r"create_model\(<model>, attention='abn'\)"):
        attnzoo.create_attention("abn", 16)
    assert attnzoo.list_attentions(level="model") == ["abn", "bridge_head"]
    assert "bridge" in attnzoo.list_attentions(level="block")
    with pytest.raises(ValueError, match="unknown attention level"):
        attnzoo.list_attentions(level="stage")
    with pytest.raises(ValueError, match="map_kernel_size"):
        attnzoo.create_model("resnet20", attention="abn", attention_kwargs={"map_kernel_size": 5})
    with pytest.raises(ValueError, match="unknown option"):
        attnzoo.create_model("resnet20", attention="abn", attention_kwargs={"reduction": 4})
