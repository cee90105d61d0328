"""ABN (Fukui et al. 2019): the two branches against their equations, the summed loss, and
training through the ordinary training loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.train import resolve_config, train
from attnzoo.train.loss import main_logits, training_loss


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def abn(randomize):
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet20", attention="abn", num_classes=7)
    with torch.no_grad():  # random BN affines/stats in the new layers, so nothing is trivial
        for bn in (model.branch_bn, model.class_bn, model.map_bn):
            randomize(bn)
    return model


def test_outputs_by_mode(abn):
    x = torch.randn(2, 3, 32, 32)
    out = abn.train()(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 7), (2, 7)]
    assert abn.eval()(x).shape == (2, 7)
    maps = abn.forward_maps(x)
    assert maps["attention_map"].shape == (2, 1, 16, 16)  # resolution of stage 2 (16x16)
    assert ((maps["attention_map"] > 0) & (maps["attention_map"] < 1)).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_equations(abn, mode):
    """g' = (1 + M) g feeds the last stage; M = sigmoid(BN(conv(A))); L_att from GAP."""
    abn.train(mode == "train")
    net = abn.backbone
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in abn.state_dict().items()}
    out = abn.forward_maps(x)
    abn.load_state_dict(state)  # undo the running-stat update of the first pass
    with torch.no_grad():
        g = net.layer2(net.layer1(net.forward_stem(x)))
        a = F.relu(abn.class_bn(abn.class_maps(abn.branch_bn(abn.branch(g)))))
        m = torch.sigmoid(abn.map_bn(abn.map_conv(a)))
        att_logits = abn.class_conv(a).sum(dim=(2, 3)) / (a.shape[2] * a.shape[3])
        perception = net.fc(net.layer3(g + g * m).mean(dim=(2, 3)))
    torch.testing.assert_close(out["attention_map"], m)
    torch.testing.assert_close(out["attention_logits"], att_logits)
    torch.testing.assert_close(out["logits"], perception)


def test_loss_is_the_sum_of_both_cross_entropies(abn):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 6])
    torch.manual_seed(0)
    out = abn.train()(x)
    expected = F.cross_entropy(out[0], y) + F.cross_entropy(out[1], y)
    torch.testing.assert_close(training_loss(out, y), expected)
    assert main_logits(out) is out[0]
    plain = torch.randn(4, 7)
    torch.testing.assert_close(training_loss(plain, y), F.cross_entropy(plain, y))


def test_parameter_count():
    # resnet20 + a copy of stage 3 at stride 1 (same parameters: option A shortcut) + BN(64)
    # + conv 64->K + BN(K) + conv K->K + conv K->1 + BN(1).
    k = 10
    plain = attnzoo.create_model("resnet20")
    stage3 = n_params(plain.layer3)
    expected = n_params(plain) + stage3 + 2 * 64 + 64 * k + 2 * k + k * k + k + 2
    assert n_params(attnzoo.create_model("resnet20", attention="abn")) == expected
    code_layout = attnzoo.create_model(
        "resnet20", attention="abn", attention_kwargs={"map_kernel_size": 3}
    )
    assert n_params(code_layout) == expected + 8 * k


def test_branch_is_a_stride_one_copy_of_the_last_stage(abn):
    assert abn.branch[0].conv1.stride == (1, 1)
    assert abn.backbone.layer3[0].conv1.stride == (2, 2)
    assert all(isinstance(b.attention, nn.Identity) for b in abn.branch)


def test_trains_through_the_training_loop(tmp_path):
    cfg = resolve_config(
        "digits",
        dataset="digits",
        model="resnet20",
        attention="abn",
        epochs=2,
        batch_size=64,
        train_subset=128,
        threads=1,
        progress=False,
    )
    summary = train(cfg, tmp_path / "run", log=lambda message: None)
    assert 0 <= summary["final_top1_err"] <= 100
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 2 and all(r["train_loss"] > 0 for r in rows)
    assert summary["params"] == n_params(attnzoo.create_model("resnet20", attention="abn"))
