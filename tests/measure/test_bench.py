"""attnzoo bench: the structure of its result and table, and its errors (never timings)."""

from __future__ import annotations

import json

import pytest

from attnzoo.cli import main
from attnzoo.measure.bench import bench, format_bench


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
