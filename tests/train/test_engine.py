"""The training loop (attnzoo/train/engine.py): run files, determinism, resume, failures."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attnzoo.data import Split
from attnzoo.train import RunError, engine, evaluate_run, resolve_config, resume, train
from attnzoo.train.fastpath import decide_precision

METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_acc",
    "test_top1_err",
    "test_top5_err",
    "lr",
    "epoch_time",
}
TIMING_KEYS = {
    "epoch_time",
    "train_time",
    "loader_time",
    "images_per_s",
    "wall_time",
    "loader_share",
}
RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoint.pt"}


def tiny_config(**overrides):
    values = dict(
        dataset="digits",
        model="resnet20",
        attention="ham",
        epochs=2,
        batch_size=64,
        train_subset=256,
        threads=2,
        progress=False,
    )
    values.update(overrides)
    return resolve_config("ham", **values)


def quiet(message: str) -> None:
    pass


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


class Crash(Exception):
    pass


def crash_after_epoch(epoch: int):
    """A ``log`` that raises once epoch ``epoch`` has been logged (i.e. after it was saved)."""

    def log(message: str) -> None:
        if message.startswith(f"epoch {epoch}/"):
            raise Crash(message)

    return log


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """digits, resnet20 + HAM, 2 epochs of 256 images: the reference run."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    train(tiny_config(), out, log=quiet)
    return out


# ------------------------------------------------------------------ a finished run


def test_run_directory_files(finished_run):
    assert {p.name for p in finished_run.iterdir()} == RUN_FILES
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config == tiny_config().to_dict()  # the fully resolved config

    rows = read_metrics(finished_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert 0 <= row["test_top5_err"] <= row["test_top1_err"] <= 100
        assert 0 <= row["train_acc"] <= 100 and np.isfinite(row["train_loss"])
        assert row["epoch_time"] > 0
    # HAM recipe over 2 epochs: milestones round(0.6)=1, round(1.2)=1, round(1.6)=2
    assert rows[0]["lr"] == pytest.approx(0.1)
    assert rows[1]["lr"] == pytest.approx(0.1 * 0.2**2)

    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["dataset"] == "digits"
    assert summary["final_top1_err"] == rows[-1]["test_top1_err"]
    assert summary["final_top5_err"] == rows[-1]["test_top5_err"]
    assert summary["best_top1_err"] == min(r["test_top1_err"] for r in rows)
    assert summary["params"] == 270_667  # resnet20 (269,722) + HAM in 9 blocks
    assert summary["wall_time"] == pytest.approx(sum(r["epoch_time"] for r in rows))


def test_weights_and_checkpoint_agree(finished_run):
    weights = load_file(str(finished_run / "model.safetensors"))
    with safe_open(str(finished_run / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert metadata == {"attnzoo": json.dumps({"epoch": 2, "precision": state["precision"]})}
    assert state["precision"] == decide_precision("auto")[0]  # what this CPU does best
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["precision"] == state["precision"]
    assert summary["machine"]["cpu"] and summary["machine"]["torch"] == torch.__version__
    assert state["epoch"] == 2 and state["step"] == 2 * 256 // 64
    assert weights.keys() == state["model"].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, state["model"][name]), name


def test_evaluate_run_reproduces_the_final_error(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    result = evaluate_run(finished_run)
    assert result["test_top1_err"] == summary["final_top1_err"]
    assert result["test_top5_err"] == summary["final_top5_err"]
    assert result["images"] == 360 and result["params"] == summary["params"]


def test_same_seed_gives_identical_weights(finished_run, tmp_path):
    train(tiny_config(), tmp_path / "again", log=quiet)
    data = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert data == (finished_run / "model.safetensors").read_bytes()
    rows = [without_timing(r) for r in read_metrics(tmp_path / "again")]
    assert rows == [without_timing(r) for r in read_metrics(finished_run)]


# ------------------------------------------------------------------ resume


def test_resume_after_a_crash_gives_the_same_run(finished_run, tmp_path):
    run = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(tiny_config(), run, log=crash_after_epoch(1))
    assert len(read_metrics(run)) == 1 and not (run / "summary.json").exists()

    summary = resume(run, log=quiet)
    assert_same_weights(run, finished_run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    reference = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    for group, ref_group in zip(
        state["optimizer"]["state"].values(), reference["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(group["momentum_buffer"], ref_group["momentum_buffer"])
    assert state["step"] == reference["step"]

    rows, ref_rows = read_metrics(run), read_metrics(finished_run)
    assert [without_timing(r) for r in rows] == [without_timing(r) for r in ref_rows]
    ref_summary = json.loads((finished_run / "summary.json").read_text())
    assert without_timing(summary) == without_timing(ref_summary)
    assert json.loads((run / "summary.json").read_text()) == summary


def test_resume_of_a_finished_run_trains_nothing(finished_run, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(finished_run, run)
    before = (run / "model.safetensors").read_bytes()
    summary = resume(run, log=quiet)
    assert summary["epochs"] == 2 and len(read_metrics(run)) == 2
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "crash_in",
    [name for name in ("save_weights", "write_metrics")],
)
def test_crash_while_saving_the_last_epoch_is_repaired_by_resume(tmp_path, monkeypatch, crash_in):
    calls = []
    original = getattr(engine, crash_in)

    def fail_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash(crash_in)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, crash_in, fail_on_second_call)
    run = tmp_path / "run"
    cfg = tiny_config(attention=None, train_subset=64, batch_size=32)
    with pytest.raises(Crash):
        train(cfg, run, log=quiet)
    monkeypatch.undo()
    summary = resume(run, log=quiet)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["attnzoo"])["epoch"] == 2
    assert summary["final_top1_err"] == evaluate_run(run)["test_top1_err"]


# ------------------------------------------------------------------ refusals


def test_training_into_an_existing_run_is_refused(finished_run):
    before = {p.name: p.read_bytes() for p in finished_run.iterdir()}
    with pytest.raises(RunError, match="already holds a run") as info:
        train(tiny_config(), finished_run, log=quiet)
    assert "--resume" in str(info.value)
    assert {p.name: p.read_bytes() for p in finished_run.iterdir()} == before


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="not a directory"):
        train(tiny_config(), tmp_path / "file", log=quiet)


@pytest.fixture
def run_without_checkpoint(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "config.yaml", run)
    return run


def test_resume_without_checkpoint(run_without_checkpoint):
    with pytest.raises(RunError, match="no checkpoint .* start it again with the same --out"):
        resume(run_without_checkpoint, log=quiet)


def test_resume_of_a_missing_directory(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        resume(tmp_path / "nothing", log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no config.yaml"):
        resume(tmp_path / "empty", log=quiet)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(range(256)) * 16, id="byte-ramp"),
        pytest.param(b"\x80\x02garbage" * 100, id="pickle-header"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 500, id="zip-header"),
        pytest.param(b"hello world\n", id="text"),
        pytest.param(b".", id="stop-opcode"),
    ],
)
def test_corrupt_checkpoint(run_without_checkpoint, garbage):
    (run_without_checkpoint / "checkpoint.pt").write_bytes(garbage)
    with pytest.raises(RunError, match="checkpoint"):
        resume(run_without_checkpoint, log=quiet)


def test_truncated_checkpoint(finished_run, run_without_checkpoint):
    data = (finished_run / "checkpoint.pt").read_bytes()
    (run_without_checkpoint / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunError, match="checkpoint"):
        resume(run_without_checkpoint, log=quiet)


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": {}}, {"epoch": 1}])
def test_checkpoint_of_another_kind(run_without_checkpoint, content):
    torch.save(content, run_without_checkpoint / "checkpoint.pt")
    with pytest.raises(RunError, match="not an attnzoo checkpoint"):
        resume(run_without_checkpoint, log=quiet)


def test_checkpoint_of_another_model(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["attention"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RunError, match="does not match this run"):
        resume(run, log=quiet)
    with pytest.raises(RunError, match="do not fit the configured model") as error:
        evaluate_run(run)
    # The useful part survives the one-line message: which keys, grouped by module.
    message = str(error.value)
    assert "\n" not in message
    assert re.search(r"unexpected \d+ \(layer1\.0\.attention\.\*, ", message), message
    assert "missing" not in message  # the plain model's keys are all in the file


def test_weights_of_another_shape(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = load_file(str(run / "model.safetensors"))
    weights["fc.bias"] = torch.zeros(7)
    save_file(weights, str(run / "model.safetensors"))
    with pytest.raises(RunError, match=r"size mismatch for fc\.bias: .*\[7\]") as error:
        evaluate_run(run)
    assert "\n" not in str(error.value)


class WriteMarkerWhenUnpickled:
    """Unpickling this object calls ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle.dump"])
def test_malicious_checkpoint_is_refused_without_running_it(
    run_without_checkpoint, tmp_path, writer
):
    marker = tmp_path / "pwned"
    evil = {"model": WriteMarkerWhenUnpickled(marker), "epoch": 1}
    path = run_without_checkpoint / "checkpoint.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    elif writer == "torch.save-legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(evil))
    assert not marker.exists()
    with pytest.raises(RunError, match="not written by attnzoo|not an attnzoo checkpoint") as e:
        resume(run_without_checkpoint, log=quiet)
    assert not marker.exists()
    assert "weights_only" not in str(e.value)  # never torch's advice to load it unsafely


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty"])
def test_corrupt_checkpoint_is_named_corrupt(finished_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    damaged = {
        "random bytes": np.random.default_rng(0).bytes(4096),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(RunError, match="is corrupt or not an attnzoo checkpoint") as e:
        resume(run, log=quiet)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_corrupt_config(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RunError, match="cannot read"):
        resume(run, log=quiet)
    (run / "config.yaml").write_text("model: resnet20\nepochz: 3\n")
    with pytest.raises(RunError, match="epochz"):
        evaluate_run(run)


def test_missing_weights(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "model.safetensors").unlink()
    with pytest.raises(RunError, match="missing weights"):
        evaluate_run(run)
    (run / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(RunError, match="cannot read weights"):
        evaluate_run(run)


def test_nan_loss_stops_with_the_step(tmp_path, monkeypatch):
    original = F.cross_entropy
    training_calls = []

    def cross_entropy(logits, target, *args, **kwargs):
        loss = original(logits, target, *args, **kwargs)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            training_calls.append(1)
            if len(training_calls) == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    run = tmp_path / "run"
    # 128 images in batches of 64: step 3 is the first step of epoch 2
    with pytest.raises(RunError, match="at epoch 2, step 3") as info:
        train(tiny_config(attention=None, train_subset=128), run, log=quiet)
    assert "nan" in str(info.value)
    # the last good checkpoint (epoch 1) is kept
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(read_metrics(run)) == 1


def test_run_that_failed_in_its_first_epoch_can_be_started_again(tmp_path, monkeypatch):
    original = F.cross_entropy

    def nan_loss(logits, target, *args, **kwargs):
        return original(logits, target, *args, **kwargs) * float("nan")

    monkeypatch.setattr(F, "cross_entropy", nan_loss)
    run = tmp_path / "run"
    cfg = tiny_config(attention=None, epochs=1, train_subset=64, batch_size=32)
    with pytest.raises(RunError, match="step 1"):
        train(cfg, run, log=quiet)
    monkeypatch.undo()
    # No epoch finished, so there is nothing to resume: the same --out starts afresh.
    with pytest.raises(RunError, match="start it again with the same --out"):
        resume(run, log=quiet)
    assert train(cfg, run, log=quiet)["epochs"] == 1
    with pytest.raises(RunError, match="--resume"):
        train(cfg, run, log=quiet)


# ------------------------------------------------------------------ real data


@pytest.mark.slow
def test_real_cifar10_smoke(cifar_root, tmp_path, monkeypatch):
    # The full 10,000-image test set takes about a minute to evaluate on 2 cores; the real
    # files are still loaded and checked, only the test split is cut to its first 256.
    real_load = engine.load_dataset

    def load_with_small_test_split(name, data_dir=None):
        data = real_load(name, data_dir)
        assert data.test.images.shape == (10_000, 32, 32, 3)
        data.test = Split(data.test.images[:256], data.test.labels[:256])
        return data

    monkeypatch.setattr(engine, "load_dataset", load_with_small_test_split)
    cfg = tiny_config(dataset="cifar10", data_dir=str(cifar_root), epochs=1, train_subset=256)
    summary = train(cfg, tmp_path / "run", log=quiet)
    assert 0 <= summary["final_top1_err"] <= 100
    assert summary["epochs"] == 1 and summary["params"] == 270_667
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])
