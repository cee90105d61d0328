"""attnzoo/train/mixing.py: torchvision's batched MixUp / CutMix, drawn from torch's global
RNG (what checkpoints save), soft targets in the loss, ABN included."""

from __future__ import annotations

import pytest
import torch
from option_helpers import peek_batches, tiny_trainer

from attnzoo.train.loss import training_loss
from attnzoo.train.mixing import build_mixing


def batch(n: int = 8, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % classes


def test_off_unless_an_alpha_and_a_probability():
    assert build_mixing(10) is None
    assert build_mixing(10, mixup_alpha=0.8, mix_prob=0.0) is None
    assert build_mixing(10, cutmix_alpha=1.0) is not None


def test_mixup_mixes_each_image_with_its_neighbour_by_the_target_weights():
    x, y = batch()
    torch.manual_seed(0)
    mixed, target = build_mixing(10, mixup_alpha=1.0)(x, y)
    assert target.shape == (8, 10) and torch.allclose(target.sum(1), torch.ones(8))
    lam = target[0, y[0]]  # y[0] != y[-1], the neighbour it is mixed with
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    assert target[0, y[-1]] == pytest.approx(1 - lam.item())


def test_cutmix_pastes_a_box_of_the_neighbour():
    x, y = batch()
    torch.manual_seed(3)
    mixed, target = build_mixing(10, cutmix_alpha=1.0)(x, y)
    from_neighbour = (mixed == x.roll(1, 0)) & (mixed != x)
    area = from_neighbour[0, 0].float().mean()
    assert 0 < area < 1
    assert target[0, y[-1]] == pytest.approx(area.item())  # lam adjusted to the box


def test_draws_come_from_torchs_global_rng():
    x, y = batch()
    mix = build_mixing(10, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.7)
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append([mix(x, y) for _ in range(4)])
    same = all(torch.equal(a[0], b[0]) for a, b in zip(outs[0], outs[1], strict=True))
    other = all(torch.equal(a[0], b[0]) for a, b in zip(outs[0], outs[2], strict=True))
    assert same and not other


def test_mix_prob_leaves_some_batches_alone_and_switch_picks_cutmix():
    x, y = batch()
    torch.manual_seed(0)
    mix = build_mixing(10, mixup_alpha=1.0, mix_prob=0.5)
    kept = sum(torch.equal(mix(x, y)[1], y) for _ in range(40))
    assert 5 < kept < 35
    only_cutmix = build_mixing(10, mixup_alpha=1.0, cutmix_alpha=1.0, mix_switch_prob=1.0)
    for _ in range(5):
        mixed, _ = only_cutmix(x, y)
        assert ((mixed == x) | (mixed == x.roll(1, 0))).all()  # a box, never a blend


def test_soft_targets_and_label_smoothing_in_the_loss_and_abn():
    logits = torch.randn(4, 10)
    soft = torch.softmax(torch.randn(4, 10), 1)
    want = -(((1 - 0.1) * soft + 0.1 / 10) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(training_loss(logits, soft, label_smoothing=0.1), want)
    aux = torch.randn(4, 10)  # ABN: both outputs against the same mixed targets
    want_aux = -(((1 - 0.1) * soft + 0.1 / 10) * aux.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(
        training_loss((logits, aux), soft, label_smoothing=0.1), want + want_aux
    )


def test_a_mixed_training_step_of_abn_runs(tmp_path):
    trainer = tiny_trainer(tmp_path, attention="abn", mixup_alpha=0.8, cutmix_alpha=1.0)
    row = trainer.train_epoch()
    assert torch.isfinite(torch.tensor(row["train_loss"]))


def test_the_engine_trains_on_the_mixed_batch(tmp_path):
    """The step's input is the mixed batch, drawn from the global RNG after the loader's."""
    trainer = tiny_trainer(tmp_path, mixup_alpha=1.0, train_subset=32)
    (x, y), state = peek_batches(trainer, 1)[0], torch.get_rng_state()
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    trainer.train_epoch()
    torch.set_rng_state(state)
    mixed, _ = build_mixing(10, mixup_alpha=1.0)(x, y)
    assert torch.equal(seen[0], mixed) and not torch.equal(seen[0], x)
