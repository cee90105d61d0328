"""attnzoo bench: the structure of its result and table, and its errors (never timings);
--device and out-of-memory handling, on the CPU (a stand-in out-of-memory error, stand-in
CUDA events) and, where a GPU is present, on CUDA (the ``device`` fixture, ``-m cuda``)."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo.measure.bench as bench_module
from attnzoo.cli import main
from attnzoo.measure.bench import (
    DeviceOutOfMemory,
    StepTimer,
    bench,
    format_bench,
    is_device_oom,
)


def test_rows_cover_every_case_with_ratios():
    result = bench(
        "resnet20",
        ["none", "eca", "abn"],
        ["eager", "channels_last"],
        batch_size=4,
        input_size=16,
        repeats=1,
        warmup=0,
    )
    cases = [(r["attention"], r["mode"]) for r in result["rows"]]
    assert cases == [(a, m) for a in ("none", "eca", "abn") for m in ("eager", "channels_last")]
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["images_per_s"] > 0
        if r["attention"] == "none":
            assert r["vs_plain"] == pytest.approx(1.0)
        if r["mode"] == "eager":
            assert r["vs_first_mode"] == pytest.approx(1.0)
    eca = next(r for r in result["rows"] if r["attention"] == "eca")
    assert eca["params"] == 269_722 + 27  # one 3-tap conv per block
    text = format_bench(result)
    assert text.count("\n| ") == 2 + 6 and "| eca | eager | 269,749 | +27 |" in text


def test_bf16_mode_runs():
    result = bench("resnet20", ["se"], ["bf16"], batch_size=2, input_size=8, repeats=1, warmup=0)
    assert result["rows"][0]["vs_plain"] is None  # no "none" row to compare with


def test_cli_json(capsys):
    argv = [
        "bench",
        "--model",
        "resnet20",
        "--attentions",
        "none",
        "se",
        "--batch-size",
        "2",
        "--input-size",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["attention"] for r in result["rows"]] == ["none", "se"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--attentions", "none", "hamm"], "unknown attention 'hamm'"),
        (["--modes", "turbo"], "unknown mode 'turbo'; choose one of: eager"),
        (["--batch-size", "0"], "must be positive"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_errors(argv, message, capsys):
    base = [
        "bench",
        "--model",
        "resnet20",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--input-size",
        "8",
    ]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ------------------------------------------------------------------ devices
OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"
SMALL = ["--model", "resnet20", "--batch-size", "2", "--input-size", "8"]
SMALL += ["--repeats", "1", "--warmup", "0"]


@pytest.mark.parametrize(
    "device,message",
    [
        ("gpu", "--device: device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("cuda:0:1", "device must be auto, cpu, cuda or cuda:N"),
        ("cuda:99", "--device cuda:99: "),  # no such GPU here, whether or not CUDA is present
        pytest.param(
            "cuda",
            "--device cuda: no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
@pytest.mark.parametrize("command", ["bench", "profile", "sweep"])
def test_cli_device_errors_are_one_line(command, device, message, capsys):
    argv = {
        "bench": ["bench", *SMALL, "--attentions", "none"],
        "profile": ["profile", "--model", "resnet20", "--no-timing", "--no-memory"],
        "sweep": ["bench", "--sweep", "--attentions", "se", "--batch-sizes", "2"],
    }[command]
    assert main([*argv, "--device", device]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_cli_device_cpu_and_auto(capsys):
    assert main(["bench", *SMALL, "--attentions", "none", "--device", "cpu", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["device"] == "cpu" and settings["timing"] == "time.perf_counter"
    assert "gpu" not in settings
    assert main(["bench", *SMALL, "--attentions", "none", "--json"]) == 0  # --device auto
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["device"].split(":")[0] == ("cuda" if torch.cuda.is_available() else "cpu")


def _oom_for(attention: str, monkeypatch) -> list[str]:
    """bench's ``attention`` steps raise CUDA's out-of-memory error when timed; returns the
    list that records each emptying of the CUDA cache."""
    real_make_step = bench_module.make_step
    freed: list[str] = []

    def make_step(model, a, *args, **kwargs):
        step, params = real_make_step(model, a, *args, **kwargs)
        if a != attention:
            return step, params

        def out_of_memory() -> None:
            raise torch.cuda.OutOfMemoryError(OOM_MESSAGE)

        return out_of_memory, params

    monkeypatch.setattr(bench_module, "make_step", make_step)
    monkeypatch.setattr(bench_module, "free_device_memory", lambda: freed.append("freed"))
    return freed


def test_out_of_memory_is_one_line_naming_the_case(monkeypatch, capsys):
    freed = _oom_for("se", monkeypatch)
    assert main(["bench", *SMALL, "--attentions", "none", "se", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    err = captured.err
    assert err.startswith("attnzoo: error: out of memory on cpu: resnet20 with attention se ")
    assert "at batch size 2, 8x8 input (tried to allocate 2.00 GiB)" in err
    assert "try a smaller --batch-size (e.g. --batch-size 1)" in err
    assert "Traceback" not in err and freed == ["freed"]


def test_out_of_memory_in_the_library_and_other_errors_pass(monkeypatch):
    _oom_for("eca", monkeypatch)
    with pytest.raises(DeviceOutOfMemory, match="resnet20 with attention eca at batch size 2"):
        bench("resnet20", ["none", "eca"], ["eager"], batch_size=2, input_size=8, repeats=1)

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(bench_module, "make_step", broken)
    with pytest.raises(RuntimeError, match="some other failure"):  # not reported as memory
        bench("resnet20", ["none"], ["eager"], batch_size=2, input_size=8, repeats=1)


def test_is_device_oom():
    assert is_device_oom(torch.cuda.OutOfMemoryError(OOM_MESSAGE))
    assert is_device_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_device_oom(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_device_oom(ValueError("CUDA out of memory"))


def test_cuda_timer_reads_event_pairs_after_synchronize(monkeypatch):
    """StepTimer's CUDA branch, with stand-in events: times are read only at ``read``, after
    a synchronize, from the event pair around each call."""
    clock = [0.0]
    synced: list[torch.device] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at: float | None = None

        def record(self) -> None:
            self.at = clock[0]

        def elapsed_time(self, end: Event) -> float:  # milliseconds, as CUDA's
            assert synced, "read before torch.cuda.synchronize"
            return 1000 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timer = StepTimer(torch.device("cuda", 0))

    def advance(seconds: float):
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    for _ in range(2):
        timer("a", advance(0.25))
        timer("b", advance(0.5))
    assert synced == []
    assert timer.read() == {"a": [0.25, 0.25], "b": [0.5, 0.5]}
    assert synced == [torch.device("cuda", 0)]


def test_table_names_the_gpu_on_cuda():
    result = bench("resnet20", ["none"], ["eager"], batch_size=2, input_size=8, repeats=1)
    cpu_text = format_bench(result)
    assert "thread" in cpu_text.splitlines()[0] and cpu_text.splitlines()[1].startswith("CPU: ")
    gpu = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.1}
    result["settings"].update(device="cuda:0", gpu={**gpu, "cuda": "13.0", "cudnn": 91000})
    lines = format_bench(result).splitlines()
    assert "cuda:0 (CUDA events)" in lines[0] and "thread" not in lines[0]
    assert lines[1] == "GPU: NVIDIA H100 80GB HBM3 (79.1 GiB) as cuda:0, CUDA 13.0, cuDNN 91000"
    assert lines[2].startswith("CPU: ")


def test_bench_on_each_device(device):
    result = bench(
        "resnet20",
        ["none", "se"],
        ["channels_last", "bf16"],
        batch_size=2,
        input_size=8,
        repeats=2,
        warmup=0,
        device=device,
    )
    assert [(r["attention"], r["mode"]) for r in result["rows"]] == [
        (a, m) for a in ("none", "se") for m in ("channels_last", "bf16")
    ]
    assert all(r["step_ms"] > 0 for r in result["rows"])
    assert torch.device(result["settings"]["device"]).type == device.type
    text = format_bench(result)
    if device.type == "cuda":
        assert result["settings"]["gpu"]["gpu"] in text and "\nGPU: " in text
        assert result["settings"]["timing"].startswith("torch.cuda.Event")
    else:
        assert "GPU:" not in text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cli_on_cuda_threads_do_not_apply(capsys):
    argv = ["bench", *SMALL, "--attentions", "none", "eca", "--device", "cuda", "--threads", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "--threads 1 sets CPU threads; it does not apply" in captured.err
    assert "\nGPU: " in captured.out and "| eca | channels_last |" in captured.out
