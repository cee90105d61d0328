"""The modern training options of TrainConfig (docs/training.md): validation, the recipe,
label smoothing in the engine and exact resume with each option on."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from option_helpers import peek_batches, tiny_config, tiny_trainer
from run_helpers import assert_same_run, leftovers

from attnzoo.cli import main
from attnzoo.train import TrainConfig, load_recipe, resume, train


def quiet(message: str) -> None:
    pass


class Crash(Exception):
    pass


def test_defaults_add_nothing_to_a_run(tmp_path):
    trainer = tiny_trainer(tmp_path)
    assert trainer.mixing is None and trainer.ema is None and trainer.loss_kwargs == {}
    assert trainer.train_loader.augment is None
    assert "ema" not in trainer.state_dict()


def test_label_smoothing_loss_is_the_hand_computed_one(tmp_path):
    trainer = tiny_trainer(tmp_path, label_smoothing=0.2, train_subset=32)
    (x, y), model = peek_batches(trainer, 1)[0], copy.deepcopy(trainer.model).train()
    log_p = model(x).log_softmax(1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    uniform = -log_p.mean(1)  # cross-entropy against the uniform distribution over 10 classes
    want = ((1 - 0.2) * nll + 0.2 * uniform).mean().item()
    plain = nll.mean().item()
    row = trainer.train_epoch()
    assert row["train_loss"] == pytest.approx(want, rel=1e-5)
    assert abs(want - plain) > 1e-3


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"optimizer": "adam"}, "unknown optimizer 'adam'; choose one of: sgd, adamw"),
        ({"betas": [0.9]}, "betas must be two numbers"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"label_smoothing": "0.1"}, "label_smoothing must be"),
        ({"mixup_alpha": -1}, "mixup_alpha is the Beta"),
        ({"cutmix_alpha": float("inf")}, "cutmix_alpha is the Beta"),
        ({"mix_prob": 1.5}, r"mix_prob must be a probability in \[0, 1\]"),
        ({"mix_switch_prob": None}, "mix_switch_prob must be a probability"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\)"),
        ({"ema_decay": None}, "ema_decay must be"),
        ({"auto_augment": "autoaugment"}, "choose one of: none, trivialaugment, randaugment"),
        ({"rand_augment_ops": 0}, r"rand_augment_ops must be an int in 1\.\.14"),
        ({"rand_augment_magnitude": 31}, r"rand_augment_magnitude must be an int in 0\.\.30"),
        ({"random_erasing": 2}, r"random_erasing is the probability .* in \[0, 1\]"),
    ],
)
def test_bad_values_are_refused_with_the_fix(values, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**values).validate()


def test_the_modern_recipe_runs_one_tiny_epoch_and_records_its_options(tmp_path, capsys):
    recipe = load_recipe("modern_cifar")
    assert recipe["auto_augment"] == "trivialaugment" and recipe["ema_decay"] > 0
    run = tmp_path / "run"
    code = main(
        ["train", "--recipe", "modern_cifar", "--dataset", "digits", "--epochs", "1",
         "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--threads", "1",
         "--no-progress", "--precision", "fp32", "--compile", "off", "--out", str(run)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in recipe.items():
        if key not in ("epochs", "batch_size", "warmup_epochs"):
            assert config[key] == value, key
    assert (run / "model_ema.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert "final_top1_err_ema" in summary


def test_flags_reach_the_config():
    from attnzoo.cli import build_parser, train_config

    args = build_parser().parse_args(
        ["train", "--optimizer", "adamw", "--betas", "0.8", "0.95", "--label-smoothing", "0.1",
         "--mixup-alpha", "0.2", "--ema-decay", "0.99", "--auto-augment", "randaugment",
         "--rand-augment-ops", "3", "--random-erasing", "0.1", "--dataset", "digits"]
    )  # fmt: skip
    cfg = train_config(args)[0]
    assert (cfg.optimizer, cfg.betas, cfg.label_smoothing, cfg.mixup_alpha) == (
        "adamw", [0.8, 0.95], 0.1, 0.2
    )  # fmt: skip
    assert (cfg.ema_decay, cfg.auto_augment, cfg.rand_augment_ops) == (0.99, "randaugment", 3)


# ------------------------------------------------------------------ exact resume, per option

OPTIONS = {
    "label_smoothing": dict(label_smoothing=0.1),
    "mixup_cutmix": dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.8, mix_switch_prob=0.5),
    "ema": dict(ema_decay=0.9),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.05),
    "trivialaugment_erasing": dict(auto_augment="trivialaugment", random_erasing=0.5),
    "randaugment": dict(auto_augment="randaugment", rand_augment_ops=2),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_resume_inside_an_epoch_is_exact_with(option, tmp_path, monkeypatch, crash_after_saves):
    # 3 steps per epoch, 2 epochs, a checkpoint every 2 steps: saves at steps 2 (mid epoch 1),
    # 3 (end of epoch 1), 4 (mid epoch 2); crash after the third, resume 1 step into epoch 2.
    def config(**more):
        return tiny_config(epochs=2, train_subset=96, **OPTIONS[option], **more)

    reference = tmp_path / "reference"
    train(config(), reference, log=quiet)
    saves = crash_after_saves(3, Crash)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(config(checkpoint_every_steps=2), run, log=quiet)
    monkeypatch.undo()
    assert saves == [2, 3, 4]
    resume(run, log=quiet)
    assert_same_run(run, reference)
    if option == "ema":
        for name in ("model_ema.safetensors", "checkpoint.pt"):
            assert (run / name).is_file()
        assert (run / "model_ema.safetensors").read_bytes() == (
            reference / "model_ema.safetensors"
        ).read_bytes()
    assert leftovers(run) == []
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 6
