"""attnzoo/train/optim.py: SGD as always, AdamW without weight decay on BN and biases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from option_helpers import peek_batches, tiny_trainer

from attnzoo.train.optim import build_optimizer, decay_groups


def test_sgd_is_unchanged_one_group_with_decay_everywhere(tmp_path):
    trainer = tiny_trainer(tmp_path)
    (group,) = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert len(group["params"]) == len(list(trainer.model.parameters()))
    assert group["weight_decay"] == trainer.cfg.weight_decay and group["momentum"] == 0.9


def test_adamw_groups_put_bn_and_biases_without_decay():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2),
    )
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "0.bias", "1.bias", "1.weight", "3.bias"
    ]  # fmt: skip
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_adamw_training_equals_a_torch_adamw_reference(tmp_path):
    """Two steps of the engine with optimizer adamw == the same steps with torch.optim.AdamW
    built here by parameter name (decay on conv/linear weights only)."""
    options = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, betas=[0.8, 0.99])
    trainer = tiny_trainer(tmp_path, **options)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    reference = copy.deepcopy(trainer.model)
    batches = peek_batches(trainer, 2)

    decay = [p for n, p in reference.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in reference.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05,
    )  # fmt: skip
    reference.train()
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()

    trainer.train_epoch()
    for (name, got), want in zip(
        trainer.model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def test_build_optimizer_refuses_unknown_names_and_bad_betas():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of: sgd, adamw"):
        build_optimizer(model, "adam")
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        build_optimizer(model, "adamw", betas=[0.9, 1.0])
