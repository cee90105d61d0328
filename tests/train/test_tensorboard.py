"""``--log tensorboard`` (attnzoo/train/loggers.py, tensorboard_log.py): scalars that equal
metrics.jsonl, figures at their cadence, resume without duplicate steps, and the errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import TINY_CONFIG, rows, without_timing

from attnzoo.cli import build_parser, main, train_config, worker_argv
from attnzoo.cli.train import check_resume_args
from attnzoo.data import load_dataset
from attnzoo.train import RunError, distributed, engine, resolve_config, resume, train
from attnzoo.train.distributed import DistContext
from attnzoo.train.loggers import RunLoggers
from attnzoo.train.tensorboard_log import LOG_DIR, TensorBoardLogger, scalar_tag

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

FIGURES = ["figures/attention_maps", "figures/channel_weights", "figures/gradcam"]


def tiny(**overrides):
    return resolve_config("digits", **{**TINY_CONFIG, "log": "tensorboard", **overrides})


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run / LOG_DIR), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def assert_scalars_are_the_metrics(run: Path) -> None:
    """Every number of every metrics.jsonl row, once per epoch, with its value (float32)."""
    log, metrics = events(run), rows(run)
    keys = [k for k, v in metrics[0].items() if k != "epoch" and isinstance(v, (int, float))]
    assert sorted(log.Tags()["scalars"]) == sorted(scalar_tag(k) for k in keys)
    for key in keys:
        logged = log.Scalars(scalar_tag(key))
        assert [e.step for e in logged] == [r["epoch"] for r in metrics], key
        assert [e.value for e in logged] == pytest.approx([r[key] for r in metrics], rel=1e-6)


@pytest.fixture(scope="module")
def cbam_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """3 epochs of resnet20 + CBAM with figures every 2 epochs: at epochs 2 and 3 (the end)."""
    out = tmp_path_factory.mktemp("tb") / "run"
    messages: list[str] = []
    train(tiny(attention="cbam", epochs=3, log_figures_every=2), out, log=messages.append)
    return out, messages


def test_scalars_equal_metrics_jsonl(cbam_run):
    run, _ = cbam_run
    assert_scalars_are_the_metrics(run)
    assert {"train/loss", "test/loss", "test/top1_err", "test/top5_err", "optim/lr"} <= set(
        events(run).Tags()["scalars"]
    )


def test_figures_at_their_cadence_and_the_end(cbam_run):
    run, messages = cbam_run
    log = events(run)
    assert sorted(log.Tags()["images"]) == FIGURES
    for tag in FIGURES:
        assert [e.step for e in log.Images(tag)] == [2, 3], tag
        assert log.Images(tag)[-1].encoded_image_string.startswith(b"\x89PNG")
    assert not [m for m in messages if "tensorboard" in m]  # CBAM has every kind: no notes


def test_config_yaml_records_the_setting(cbam_run):
    run, _ = cbam_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["log"] == ["tensorboard"] and config["log_figures_every"] == 2


def test_model_without_attention_maps_logs_grad_cam_with_a_note(tmp_path):
    cfg = tiny(attention="se")
    data = load_dataset("digits")
    model = engine.build_model(cfg, data.num_classes)
    messages: list[str] = []
    logger = TensorBoardLogger(cfg, tmp_path, data)
    for epoch in (1, 2):  # 2 is the last epoch: figures, and the note only once
        logger.epoch_end({"epoch": epoch, "train_loss": 1.0}, model, messages.append)
    logger.close()
    log = events(tmp_path)
    assert sorted(log.Tags()["images"]) == ["figures/channel_weights", "figures/gradcam"]
    assert [e.step for e in log.Images("figures/gradcam")] == [2]
    assert messages == [
        "note: tensorboard: resnet20+se has no attention module with a spatial map: "
        "no attention_maps"
    ]


def test_resume_continues_the_log_without_duplicate_steps(tmp_path, monkeypatch):
    """A crash after epoch 2 was logged but before it was saved: the resumed run trains epoch 2
    again, and TensorBoard shows it once."""
    out = tmp_path / "run"
    real_save_weights, calls = engine.save_weights, []

    class Crash(Exception):
        pass

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        real_save_weights(*args, **kwargs)

    monkeypatch.setattr(engine, "save_weights", crash_on_second)
    with pytest.raises(Crash):
        train(tiny(log_figures_every=0), out, log=lambda m: None)
    assert [e.step for e in events(out).Scalars("train/loss")] == [1, 2]  # 2 is not saved
    monkeypatch.setattr(engine, "save_weights", real_save_weights)
    resume(out, log=lambda m: None)
    assert len(list((out / LOG_DIR).glob("events.out.tfevents.*"))) == 2  # appended
    assert_scalars_are_the_metrics(out)  # steps 1, 2 once each
    assert events(out).Tags()["images"] == []  # log_figures_every=0


def test_only_rank_0_logs(tmp_path):
    loggers = RunLoggers(tiny(), tmp_path, None, DistContext(rank=1, world_size=2))
    assert loggers.backends == []
    with RunLoggers(tiny(), tmp_path, None) as loggers:
        assert len(loggers.backends) == 1
    assert not (tmp_path / LOG_DIR).exists()  # opened at the first epoch logged, not before


def test_missing_package_stops_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    with pytest.raises(RunError, match=r"pip install 'attnzoo\[tensorboard\]'"):
        train(tiny(), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()
    code = main(
        ["train", "--dataset", "digits", "--log", "tensorboard", "--out", str(tmp_path / "cli")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs the tensorboard package" in err and "attnzoo[tensorboard]" in err
    assert not (tmp_path / "cli").exists()
    # --nproc: one error from the launcher, no worker processes started.
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: launched.append(a) or 0)
    argv = ["train", "--dataset", "digits", "--log", "tensorboard", "--nproc", "2"]
    code = main([*argv, "--out", str(tmp_path / "ddp")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "attnzoo[tensorboard]" in err
    assert launched == [] and not (tmp_path / "ddp").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(log="tensorbord"), "unknown logger 'tensorbord' in log; choose from: tensorboard"),
        (dict(log=["tensorboard", "tensorboard"]), "log names a logger twice"),
        (dict(log=3), "log must be a list of logger names"),
        (dict(log_figures_every=-1), "log_figures_every must be an int >= 0"),
        (dict(log_figures_every=True), "log_figures_every must be an int >= 0"),
        (dict(log_figures_every="5"), "log_figures_every must be an int >= 0"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_cli_flags(capsys):
    argv = ["train", "--dataset", "digits", "--log", "tensorboard", "--log-figures-every", "3"]
    args = build_parser().parse_args(argv)
    cfg, _ = train_config(args)
    assert cfg.log == ["tensorboard"] and cfg.log_figures_every == 3
    workers = worker_argv(args)  # what --nproc's processes are given
    assert "--log=tensorboard" in workers and "--log-figures-every=3" in workers
    assert train_config(build_parser().parse_args(workers))[0] == cfg
    assert resolve_config("digits").log == []  # off by default
    code = main(["train", "--dataset", "digits", "--log", "wandb"])
    assert code == 2 and "unknown logger 'wandb'" in capsys.readouterr().err
    resumed = build_parser().parse_args(["train", "--resume", "runs/x", "--log", "tensorboard"])
    with pytest.raises(ValueError, match="drop --log"):  # a resume logs as its run does
        check_resume_args(resumed)


def test_logging_does_not_change_training(cbam_run, tmp_path):
    """Figures come from a copy of the model with the RNG state restored: the same run."""
    run, _ = cbam_run
    out = tmp_path / "plain"
    train(tiny(attention="cbam", epochs=3, log=[]), out, log=lambda m: None)
    assert (out / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert [without_timing(r) for r in rows(out)] == [without_timing(r) for r in rows(run)]
    assert not (out / LOG_DIR).exists()
