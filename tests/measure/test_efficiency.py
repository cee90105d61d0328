"""attnzoo bench --efficiency: the FLOP count it uses, the structure of its result and
table (never the timings or the achieved rate themselves)."""

from __future__ import annotations

import json

import pytest

from attnzoo.cli import main
from attnzoo.measure import ModelSpec, profile
from attnzoo.measure.efficiency import efficiency, format_efficiency, time_matmul, train_step_flops


def test_step_flops_are_profiles_per_image_count_times_the_batch():
    per_image = profile(ModelSpec("resnet20", "se"), input_size=16, timing=False, memory=False)
    assert train_step_flops("resnet20", "se", 6, 16) == 6 * per_image["rows"][1]["train_flops"]


def test_matmul_timing():
    times = time_matmul(64, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)


def test_rows_and_table():
    result = efficiency(
        "resnet20",
        ["none", "eca"],
        batch_size=2,
        input_size=8,
        repeats=1,
        warmup=0,
        matmul_size=64,
    )
    assert [r["attention"] for r in result["rows"]] == ["none", "eca"]
    assert set(result["matmul"]) == {"gflops", "gflops_before", "gflops_after"}
    for r in result["rows"]:
        assert r["train_flops_per_step"] == train_step_flops("resnet20", r["attention"], 2, 8)
        assert r["achieved_gflops"] == pytest.approx(
            r["train_flops_per_step"] / r["step_ms"] * 1e3 / 1e9
        )
        assert r["fraction_of_matmul"] == pytest.approx(
            r["achieved_gflops"] / result["matmul"]["gflops"]
        )
    assert result["rows"][0]["vs_plain"] == pytest.approx(1.0)
    text = format_efficiency(result)
    assert "fp32 matmul 64x64:" in text and "| of matmul rate |" in text
    assert text.count("\n| ") == 2 + 2


def test_cli_json(capsys):
    argv = ["bench", "--efficiency", "--model", "resnet20", "--attentions", "none"]
    argv += ["--batch-size", "2", "--input-size", "8", "--repeats", "1", "--warmup", "0"]
    assert main(argv + ["--matmul-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["matmul_size"] == 32 and len(result["rows"]) == 1
