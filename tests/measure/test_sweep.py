"""attnzoo bench --sweep: the grid's rows, the skip and memory guards, the table and the
plot (never the timings themselves); a CUDA out-of-memory point (a stand-in error on the
CPU) and, where a GPU is present, the sweep on CUDA."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo.measure.sweep as sweep_module
from attnzoo.cli import main
from attnzoo.measure.sweep import format_sweep, plot_sweep, predict_step_s, sweep


def test_rows_cover_the_grid_in_order():
    result = sweep(
        "resnet20",
        ["se", "csm"],
        batch_sizes=[2, 3],
        input_sizes=[16, 8],
        repeats=1,
        warmup=0,
        max_step_s=None,
        isolate=False,
    )
    keys = [(r["batch_size"], r["input_size"], r["attention"]) for r in result["rows"]]
    assert keys == [
        (b, s, a) for b in (2, 3) for s in (8, 16) for a in ("none", "se", "csm")
    ]  # sizes ascending, the plain network first
    for r in result["rows"]:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["positions"] == r["input_size"] ** 2
        if r["attention"] == "none":
            assert r["vs_plain"] == pytest.approx(1.0)
    assert result["settings"]["input_sizes"] == [8, 16]
    text = format_sweep(result)
    assert text.count("\nbatch ") == 2
    assert "| attention | 8x8 (H*W 64) | 16x16 (H*W 256) |" in text
    assert text.count("\n| csm | ") == 2


def test_predicted_slow_points_are_skipped_and_say_so():
    result = sweep(
        "resnet20",
        ["se"],
        batch_sizes=[2],
        input_sizes=[8, 16],
        repeats=1,
        warmup=0,
        max_step_s=1e-9,
        isolate=False,
    )
    plain16, se16 = [r for r in result["rows"] if r["input_size"] == 16]
    assert plain16["status"] == "ok"  # the baseline is always measured
    assert se16["status"] == "skipped" and se16["predicted_s"] > 0 and se16["step_ms"] is None
    assert se16["predicted_vs_plain"] == pytest.approx(
        se16["predicted_s"] / (plain16["step_ms"] / 1000)
    )
    assert "skipped (predicted" in format_sweep(result)


def test_prediction_uses_the_measured_growth():
    assert predict_step_s([], 100) is None
    assert predict_step_s([(100, 1.0)], 400) == pytest.approx(16.0)  # exponent 2 by default
    assert predict_step_s([(100, 1.0), (400, 4.0)], 1600) == pytest.approx(16.0)  # exponent 1
    assert predict_step_s([(100, 1.0), (400, 1.0)], 1600) == pytest.approx(4.0)  # at least 1


def test_out_of_memory_is_reported_and_larger_sizes_not_tried():
    result = sweep(
        "resnet20",
        ["rcca"],
        batch_sizes=[4],
        input_sizes=[8, 128, 160],
        repeats=1,
        warmup=0,
        max_step_s=None,
        memory_gib=0.25,  # rcca at 128x128 needs about 1.8 GiB
    )
    status = {(r["input_size"], r["attention"]): r["status"] for r in result["rows"]}
    assert status[(8, "rcca")] == "ok"
    assert status[(128, "rcca")] == "out of memory"
    assert status[(160, "rcca")] == "skipped"
    assert "skipped (out of memory at 128x128)" in format_sweep(result)


def test_plot(tmp_path):
    result = sweep(
        "resnet20", ["eca"], [2], [8, 16], repeats=1, warmup=0, max_step_s=None, isolate=False
    )
    plot_sweep(result, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_sweep_json_and_plot(tmp_path, capsys):
    png = tmp_path / "s.png"
    argv = ["bench", "--sweep", "--attentions", "se", "--batch-sizes", "2"]
    argv += ["--input-sizes", "8", "--repeats", "1", "--warmup", "0", "--json"]
    assert main(argv + ["--plot", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["model"] == "resnet20"  # the sweep's cheaper default
    assert [r["attention"] for r in result["rows"]] == ["none", "se"]
    assert png.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--timm"], "--sweep cannot be combined"),
        (["--modes", "eager", "channels_last"], "take one mode"),
        (["--modes", "compiled"], "recompiles per size"),
        (["--input-sizes", "0"], "must be positive"),
    ],
)
def test_cli_sweep_errors(argv, message, capsys):
    base = ["bench", "--sweep", "--attentions", "se", "--batch-sizes", "2", "--input-sizes", "8"]
    assert main(base + ["--repeats", "1", "--warmup", "0"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cuda_out_of_memory_point_is_marked_and_the_sweep_goes_on(monkeypatch, tmp_path):
    """csm's timed step at (batch 2, 16x16) raises CUDA's out-of-memory error (a stand-in,
    on the CPU): that point reads "out of memory", the cache is emptied, the points that need
    at least as much memory (batch 3 at 16x16) are skipped, every other point is measured."""
    real_make_step = sweep_module.make_step
    freed: list[str] = []

    def make_step(model, attention, mode, batch, size, *args, **kwargs):
        step, params = real_make_step(model, attention, mode, batch, size, *args, **kwargs)
        if (attention, batch, size) != ("csm", 2, 16):
            return step, params
        calls = []

        def out_of_memory_when_timed() -> None:
            calls.append(1)
            if len(calls) > 1:  # the warm-up step passes, the first timed one fails
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")
            step()

        return out_of_memory_when_timed, params

    monkeypatch.setattr(sweep_module, "make_step", make_step)
    monkeypatch.setattr(sweep_module, "free_device_memory", lambda: freed.append("freed"))
    result = sweep(
        "resnet20",
        ["se", "csm"],
        batch_sizes=[2, 3],
        input_sizes=[8, 16],
        repeats=1,
        warmup=0,
        max_step_s=None,
        isolate=False,
    )
    row = {(r["batch_size"], r["input_size"], r["attention"]): r for r in result["rows"]}
    assert row[(2, 16, "csm")]["status"] == "out of memory"
    assert "OutOfMemoryError: CUDA out of memory" in row[(2, 16, "csm")]["message"]
    assert row[(2, 16, "csm")]["step_ms"] is None and freed == ["freed"]
    assert row[(3, 16, "csm")]["status"] == "skipped"
    assert row[(3, 16, "csm")]["message"] == "out of memory at batch 2, 16x16"
    for key in [(b, s, a) for b in (2, 3) for s in (8, 16) for a in ("none", "se", "csm")]:
        if key not in ((2, 16, "csm"), (3, 16, "csm")):
            assert row[key]["status"] == "ok" and row[key]["step_ms"] > 0, key
    assert json.loads(json.dumps(result))["rows"] == result["rows"]
    text = format_sweep(result)
    assert "| csm | " in text and " | out of memory |" in text
    assert "skipped (out of memory at batch 2, 16x16)" in text
    assert "out of memory: the step did not fit in this machine's memory" in text
    plot_sweep(result, str(tmp_path / "oom.png"))  # the point is a cross on the plot
    assert (tmp_path / "oom.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_on_each_device(device):
    result = sweep(
        "resnet20",
        ["eca"],
        [2],
        [8],
        repeats=2,
        warmup=0,
        max_step_s=None,
        isolate=False,
        device=device,
    )
    assert [(r["attention"], r["status"]) for r in result["rows"]] == [
        ("none", "ok"),
        ("eca", "ok"),
    ]
    st = result["settings"]
    assert torch.device(st["device"]).type == device.type
    if device.type == "cuda":
        assert st["memory_gib"] is None  # the GPU's memory is the limit
        assert "\nGPU: " in format_sweep(result)
