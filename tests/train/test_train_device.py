"""Training on a device (issue 12): ``--device``, the data made on the device, the checks that
do not synchronise every step on a GPU, a run moving between devices, fp16's scaler state.

The ``device`` fixture runs the device tests on the CPU and, where CUDA is present, on the
GPU (``pytest -m cuda`` runs only those). The cadence of the GPU's checks is tested on the
CPU by giving a CPU run the GPU's cadence.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from run_helpers import TINY_CONFIG, attnzoo, rows, without_timing

from attnzoo.data import InMemoryLoader
from attnzoo.experiments.reproduce import parse_devices
from attnzoo.train import RunError, engine, evaluate_run, resolve_config, resume, train
from attnzoo.train.fastpath import check_device, decide_precision, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def quiet(message: str) -> None:
    pass


def tiny(**overrides):
    return resolve_config("digits", **{**TINY_CONFIG, **overrides})


# ------------------------------------------------------------------ the setting


@pytest.mark.parametrize("good", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_settings_that_are_accepted(good):
    check_device(good)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "", None, 0, "mps"])
def test_device_settings_that_are_refused(bad):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        check_device(bad)
    if bad is not None:  # resolve_config reads None as "the default"
        with pytest.raises(ValueError, match="device"):
            tiny(device=bad).validate()


def test_auto_is_cuda_exactly_when_cuda_is_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r"--device cuda: no CUDA device .*use --device cpu"):
        resolve_device("cuda")
    result = subprocess.run(
        attnzoo("train", "--dataset", "digits", "--recipe", "digits", "--epochs", "1",
                "--train-subset", "64", "--device", "cuda", "--out", tmp_path / "run"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cuda_precision_rule():
    # fp16 is refused on the CPU; auto on a GPU is bf16 where supported, else fp32.
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        decide_precision("fp16", "cpu")
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        assert decide_precision("auto", "cuda")[0] == expected


def test_reproduce_devices_list():
    assert parse_devices(None) == ["auto"]
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="--devices: device must be"):
        parse_devices("cuda:0,gpu")
    with pytest.raises(ValueError, match="empty item"):
        parse_devices("cuda:0,,cpu")


# ------------------------------------------------------------------ runs on the device


def test_a_run_trains_on_the_device_and_records_it(device, tmp_path):
    summary = train(tiny(device=str(device)), tmp_path / "run", log=quiet)
    (entry,) = summary["devices"]
    assert entry["device"].startswith(device.type) and entry["from_step"] == 0
    if device.type == "cuda":
        assert entry["gpu"] == torch.cuda.get_device_name(device) and entry["cuda"]
    # The checkpoint holds CPU tensors only: it loads on a machine without a GPU.
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["devices"] == summary["devices"]
    assert {t.device.type for t in tensors_in(state)} == {"cpu"}
    result = evaluate_run(tmp_path / "run", device="cpu")
    assert result["device"] == "cpu"
    if device.type == "cpu":  # the same computation: the same error
        assert result["test_top1_err"] == summary["final_top1_err"]
    else:  # 32 test images: kernels' rounding may flip one (3.125 points)
        assert abs(result["test_top1_err"] - summary["final_top1_err"]) <= 3.2


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def test_a_run_moves_to_another_device_on_resume(device, tmp_path, crash_after_saves):
    class Crash(Exception):
        pass

    run = tmp_path / "run"
    crash_after_saves(1, Crash)
    with pytest.raises(Crash):
        train(tiny(device=str(device)), run, log=quiet)
    lines = []
    summary = resume(run, log=lines.append, device="cpu")
    assert lines[0].endswith("on cpu")
    kinds = [d["device"] for d in summary["devices"]]
    # Trained on the fixture's device for one epoch, then on the CPU (one entry if the same).
    assert kinds == (["cpu"] if device.type == "cpu" else [str(device), "cpu"])
    assert summary["devices"][-1]["from_step"] in (0, 2)
    assert summary["epochs"] == 2


def test_on_a_cpu_the_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, crash_after_saves):
    # Giving the device explicitly changes nothing on the CPU: the resume stays exact.
    class Crash(Exception):
        pass

    reference = train(tiny(device="cpu"), tmp_path / "ref", log=quiet)
    crash_after_saves(1, Crash)
    with pytest.raises(Crash):
        train(tiny(device="auto" if not torch.cuda.is_available() else "cpu"), tmp_path / "run",
              log=quiet)  # fmt: skip
    resumed = resume(tmp_path / "run", log=quiet, device="cpu")
    assert without_timing(resumed) == without_timing(reference)
    assert [without_timing(r) for r in rows(tmp_path / "run")] == [
        without_timing(r) for r in rows(tmp_path / "ref")
    ]


# ------------------------------------------------------------------ GPU cadence, on the CPU


def test_a_non_finite_loss_found_at_the_cadence_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    """With the GPU's cadence (checks every 3 steps, at each epoch's end and before each
    checkpoint), a NaN loss at step 5 is found at the check of step 6; no checkpoint is
    written after the NaN."""
    real_init = engine.Trainer.__init__

    def gpu_cadence(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.sync_every = 3

    real_loss = engine.training_loss
    calls = {"n": 0}

    def nan_at_step_5(output, target, **kw):
        calls["n"] += 1
        loss = real_loss(output, target, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss

    saved_steps = []
    real_save = engine.save_checkpoint

    def record(path, state):
        saved_steps.append(state["step"])
        real_save(path, state)

    monkeypatch.setattr(engine.Trainer, "__init__", gpu_cadence)
    monkeypatch.setattr(engine, "training_loss", nan_at_step_5)
    monkeypatch.setattr(engine, "save_checkpoint", record)
    cfg = tiny(epochs=3, train_subset=128, checkpoint_every_steps=2)  # 4 steps an epoch
    with pytest.raises(RunError, match=r"non-finite after step 4 at epoch 2, step 6"):
        train(cfg, tmp_path / "run", log=quiet)
    # Checkpoints at steps 2 and 4 (mid and end of epoch 1); none at or after the NaN.
    assert saved_steps == [2, 4]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4


def test_the_cpu_checks_every_step(tmp_path, monkeypatch):
    real_loss = engine.training_loss
    calls = {"n": 0}

    def nan_at_step_2(output, target, **kw):
        calls["n"] += 1
        loss = real_loss(output, target, **kw)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(engine, "training_loss", nan_at_step_2)
    with pytest.raises(RunError, match=r"loss is nan at epoch 1, step 2"):
        train(tiny(), tmp_path / "run", log=quiet)


# ------------------------------------------------------------------ data on the device


def loader_pair(device):
    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True, pad=2, flip=True, seed=7)
    on_cpu = InMemoryLoader(images, np.arange(40), 8, **common)
    there = InMemoryLoader(images, np.arange(40), 8, **common).to(device)
    return on_cpu, there


def test_the_loader_makes_the_same_batches_on_the_device(device):
    on_cpu, there = loader_pair(device)
    assert there.images.device.type == device.type and there.images.dtype == torch.uint8
    for _ in range(2):  # two epochs: the CPU generator drives both alike
        for (xa, ya), (xb, yb) in zip(on_cpu, there, strict=True):
            assert xb.device.type == device.type and yb.device.type == device.type
            assert torch.equal(ya, yb.cpu())
            torch.testing.assert_close(xb.cpu(), xa, rtol=0, atol=1e-6)
    # The resume state is the same, on the CPU, whatever the device.
    it_a, it_b = iter(on_cpu), iter(there)
    next(it_a), next(it_b)
    sa, sb = on_cpu.state_dict(), there.state_dict()
    assert torch.equal(sa["order"], sb["order"]) and sb["order"].device.type == "cpu"


@pytest.mark.parametrize("augment", ["none", "erasing", "trivialaugment"])
def test_every_batch_tensor_is_made_on_the_loaders_device(augment):
    """On the meta device (no data, but any tensor made on the CPU by mistake would clash with
    it): the loader's GPU path (packed index uploads, crops, flips, the per-image policies and
    random erasing) runs without a GPU, and every batch comes out on the device."""
    from attnzoo.data.augment import build_augment

    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    loader = InMemoryLoader(
        images, np.arange(40), 8, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, pad=2,
        flip=True, seed=7, channels_last=True,
    ).to("meta")  # fmt: skip
    if augment == "erasing":
        loader.set_augment(build_augment(random_erasing=0.5))
    elif augment == "trivialaugment":
        loader.set_augment(build_augment("trivialaugment"))
    batches = list(loader)
    assert len(batches) == 5
    for x, y in batches:
        assert x.device.type == "meta" and y.device.type == "meta"
        assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert loader.state_dict()["position"] == 0  # the epoch's state stays on the CPU


# ------------------------------------------------------------------ GPU only


@cuda
@pytest.mark.cuda
def test_fp16_keeps_its_scaler_state_across_a_resume(tmp_path, crash_after_saves):
    class Crash(Exception):
        pass

    cfg = tiny(device="cuda", precision="fp16", deterministic=True)
    reference = train(cfg, tmp_path / "ref", log=quiet)
    crash_after_saves(1, Crash)
    with pytest.raises(Crash):
        train(tiny(device="cuda", precision="fp16", deterministic=True), tmp_path / "run",
              log=quiet)  # fmt: skip
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["precision"] == "fp16" and "scale" in state["scaler"]
    with pytest.raises(RunError, match="fp16 .* needs a CUDA device"):
        resume(tmp_path / "run", log=quiet, device="cpu")
    resumed = resume(tmp_path / "run", log=quiet, device="cuda")
    assert without_timing(resumed)["final_top1_err"] == reference["final_top1_err"]


@cuda
@pytest.mark.cuda
def test_deterministic_gpu_runs_repeat_bitwise(tmp_path):
    a = train(tiny(device="cuda", deterministic=True), tmp_path / "a", log=quiet)
    b = train(tiny(device="cuda", deterministic=True), tmp_path / "b", log=quiet)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    assert json.dumps(without_timing(a), sort_keys=True, default=str) == json.dumps(
        without_timing(b), sort_keys=True, default=str
    )
