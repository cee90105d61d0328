"""Precision (attnzoo/train/fastpath.py): ``auto`` follows the CPU, the choice is recorded and
kept on resume, bf16 runs train and resume exactly, and bad settings are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import TINY_CONFIG

from attnzoo.train import engine, fastpath, resolve_config
from attnzoo.utils import machine

TINY = {**TINY_CONFIG, "attention": "ham"}


@pytest.mark.parametrize(
    ("flags", "capability", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16"),  # AMD EPYC (Zen 4)
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AVX512", "bf16"),  # AMX
        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", "fp32"),  # forced lower
        ({"avx2", "fma"}, "AVX2", "fp32"),  # no bf16 instructions: bf16 was 11.5x slower
        ({"avx2", "avx512f"}, "AVX512", "fp32"),
    ],
)
def test_auto_follows_the_cpu(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    precision, why = fastpath.decide_precision("auto")
    assert precision == expected and why.startswith("auto: ")


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_explicit_precisions_are_kept(setting):
    assert fastpath.decide_precision(setting)[0] == setting


def test_fp16_needs_cuda_and_unknown_values_are_refused():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        fastpath.decide_precision("fp16")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        resolve_config("digits", precision="half")


def test_autocast_context():
    with fastpath.autocast("bf16"):
        assert torch.nn.Linear(4, 3)(torch.randn(2, 4)).dtype == torch.bfloat16
    with fastpath.autocast("fp32"):
        assert torch.nn.Linear(4, 3)(torch.randn(2, 4)).dtype == torch.float32


def test_resume_keeps_the_recorded_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_prefers_bf16", lambda: False)
    trainer = engine.Trainer(resolve_config("digits", **TINY), tmp_path)
    assert trainer.precision == "fp32"
    state = trainer.state_dict()
    assert state["precision"] == "fp32"
    trainer.load_state_dict({**state, "precision": "bf16"})  # started on a bf16 CPU
    assert (trainer.precision, trainer.precision_reason) == ("bf16", "as the run started")
    del state["precision"]  # from before the setting: fp32
    trainer.load_state_dict(state)
    assert trainer.precision == "fp32"
    with pytest.raises(engine.RunError, match="checkpoint does not match this run"):
        trainer.load_state_dict({**state, "precision": "fp8"})


def test_a_bf16_run_resumed_mid_epoch_is_exact(tmp_path, monkeypatch, crash_after_saves):
    """bf16 autocast is deterministic on the CPU: stop and resume give the same bits."""
    cfg = resolve_config("digits", **TINY, precision="bf16", checkpoint_every_steps=1)
    reference = tmp_path / "reference"
    engine.train(cfg, reference, log=lambda m: None)
    run = tmp_path / "run"
    saves = crash_after_saves(3)  # after step 3: one step into epoch 2
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run, log=lambda m: None)
    monkeypatch.undo()
    assert saves == [1, 2, 3]
    engine.resume(run, log=lambda m: None)
    assert (run / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    evaluated = engine.evaluate_run(run)
    assert evaluated["precision"] == "bf16"
    assert evaluated["test_top1_err"] == summary["final_top1_err"]


def test_bf16_training_changes_the_weights_like_fp32(tmp_path):
    """One bf16 epoch moves the weights about as far as one fp32 epoch (a gate that broke
    under autocast would leave its parameters still, or blow them up)."""
    moved = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve_config("digits", **{**TINY, "epochs": 1}, precision=precision)
        trainer = engine.Trainer(cfg, tmp_path / precision)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit(log=lambda m: None)
        after = trainer.model.state_dict()
        moved[precision] = {
            k: (after[k].float() - before[k].float()).norm().item()
            for k in before
            if before[k].is_floating_point() and "attention" in k
        }
    assert moved["bf16"].keys() == moved["fp32"].keys() and moved["fp32"]
    assert all(torch.isfinite(torch.tensor(v)) for v in moved["bf16"].values())
    # Per parameter, bf16 rounding dominates the tiny moves of BN shifts (1e-5); the
    # attention's total move is the robust measure.
    total = {p: sum(v * v for v in moved[p].values()) ** 0.5 for p in moved}
    assert total["fp32"] > 1e-3
    assert 0.5 < total["bf16"] / total["fp32"] < 2.0, total


def test_machine_info_names_the_cpu():
    info = machine.machine_info()
    assert info["cpu"] and info["torch"] == torch.__version__
    assert set(info["cpu_flags"]) <= set(machine.SPEED_FLAGS)
    line = machine.describe_machine(info)
    assert info["cpu"] in line and "ATen" in line
