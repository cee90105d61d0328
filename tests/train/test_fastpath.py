"""The compile setting: the ``auto`` rule, how a run records it, and a compiled smoke run."""

from __future__ import annotations

import pytest
import torch
import yaml
from run_helpers import TINY_CONFIG
from torch import nn

import attnzoo
from attnzoo.cli import build_parser, train_config
from attnzoo.train import engine, resolve_config
from attnzoo.train.config import TrainConfig
from attnzoo.train.fastpath import (
    COMPILE_SECONDS,
    MIN_COMPILED_STEPS,
    compile_saving,
    decide_compile,
    estimated_step_seconds,
    macs_per_image,
)

TINY = TINY_CONFIG  # resnet20 on 64 digits, batch 32: 2 steps per epoch


def test_auto_is_off_for_too_few_steps() -> None:
    compile_, why = decide_compile("auto", MIN_COMPILED_STEPS - 1, 100.0)
    assert compile_ is False and "too few" in why


def test_auto_is_off_when_the_saving_is_smaller_than_the_compile_time() -> None:
    compile_, why = decide_compile("auto", 10 * MIN_COMPILED_STEPS, 0.01)
    assert compile_ is False and "less than compiling" in why


def test_auto_compiles_a_full_cifar_resnet56_run() -> None:
    """200 epochs of CIFAR-10 at batch 128 (390 steps each): about 2 s a step on 1 thread."""
    macs = macs_per_image(attnzoo.create_model("resnet56"), 3, (32, 32))
    assert 120e6 < macs < 130e6  # 125M, as `attnzoo profile` counts
    step = estimated_step_seconds(macs, 128, threads=1)
    assert 1.0 < step < 3.0
    compile_, why = decide_compile("auto", 200 * 390, step)
    assert compile_ is True and "more than compiling" in why
    # ... and at this step time the break-even point is in the thousands of steps.
    assert decide_compile("auto", int(COMPILE_SECONDS / (0.04 * step)) - 1, step)[0] is False


@pytest.mark.parametrize(("attention", "compiles"), [(None, True), ("se", True), ("ham", False)])
def test_auto_leaves_attentions_with_faster_fused_gates_eager(attention, compiles) -> None:
    saving = compile_saving(attention)
    assert decide_compile("auto", 200 * 390, 2.0, saving)[0] is compiles
    assert decide_compile(True, 200 * 390, 2.0, saving)[0] is True


@pytest.mark.parametrize("setting", [True, False])
def test_on_and_off_are_kept(setting: bool) -> None:
    assert decide_compile(setting, 1, 0.0)[0] is setting
    assert decide_compile(setting, 10**9, 10.0)[0] is setting


@pytest.mark.parametrize("value", ["yes", "on", 1, None, "Auto"])
def test_bad_setting_raises(value: object) -> None:
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(compile=value).validate()


@pytest.mark.parametrize(("flag", "value"), [(None, "auto"), ("auto", "auto"), ("on", True)])
def test_cli_flag(flag: str | None, value: object, tmp_path) -> None:
    argv = ["train", "--dataset", "digits", "--recipe", "digits", "--out", str(tmp_path)]
    argv += [] if flag is None else ["--compile", flag]
    cfg, _ = train_config(build_parser().parse_args(argv))
    assert cfg.compile == value
    cfg, _ = train_config(build_parser().parse_args([*argv[:-2], "--compile", "off"]))
    assert cfg.compile is False


def test_tiny_run_resolves_auto_to_off_and_records_it(tmp_path) -> None:
    cfg = resolve_config("digits", **TINY)
    assert cfg.compile == "auto"
    engine.train(cfg, tmp_path / "run", log=lambda message: None)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["compile"] == "auto"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["compiled"] is False  # what --resume keeps


def test_resume_keeps_the_recorded_choice(tmp_path) -> None:
    cfg = resolve_config("digits", **TINY)
    trainer = engine.Trainer(cfg, tmp_path)
    assert not trainer.compiled and trainer.train_model is trainer.eager_model
    state = trainer.state_dict()
    trainer.load_state_dict({**state, "compiled": True})  # started compiled elsewhere
    assert trainer.compiled
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    del state["compiled"]  # a checkpoint from before the setting: eager
    trainer.load_state_dict(state)
    assert not trainer.compiled and trainer.train_model is trainer.eager_model


class TinyNet(nn.Module):
    """conv, BN, ReLU, SE, pool, linear: compiles in seconds rather than a ResNet's minute."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            attnzoo.create_attention("se", 8, reduction=4),
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.slow
def test_compile_on_trains_and_saves_plain_weights(tmp_path, monkeypatch) -> None:
    """``compile: true`` trains through torch.compile (inductor) for a few steps; the
    checkpoint holds the uncompiled module's keys (no ``_orig_mod.`` prefix) and resumes."""
    monkeypatch.setattr(engine, "build_model", lambda cfg, num_classes: TinyNet(num_classes))
    cfg = resolve_config("digits", **{**TINY, "compile": True})
    trainer = engine.Trainer(cfg, tmp_path)
    assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.epoch = cfg.epochs - 1  # one epoch: 2 compiled steps
    trainer.fit(log=lambda message: None)
    assert any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["model"].keys() == TinyNet(10).state_dict().keys()
    assert not any(key.startswith("_orig_mod") for key in state["model"])
    resumed = engine.Trainer(resolve_config("digits", **{**TINY, "compile": True}), tmp_path)
    resumed.load_state_dict(state)
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
