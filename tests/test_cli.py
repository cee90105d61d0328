"""The command line (attnzoo/cli.py): listing, a tiny train + eval, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torchvision

from attnzoo.cli import main

TINY = ["--epochs", "1", "--train-subset", "64", "--batch-size", "32", "--threads", "2"]
TINY += ["--no-progress"]


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr); argparse errors exit via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attnzoo: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# ------------------------------------------------------------------ list


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    tables = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert set(tables) == {
        "models",
        "attentions",
        "block-level attentions",
        "conv-level attentions",
        "model-level attentions",
        "datasets",
        "recipes",
        "tables",
    }
    assert tables["model-level attentions"] == "abn, bridge_head"
    assert "sk" in tables["conv-level attentions"].split(", ")
    assert "resnet20" in tables["models"].split(", ")
    assert "ham" in tables["attentions"].split(", ")
    assert tables["datasets"] == "cifar10, cifar100, digits, imagenet, stl10"
    assert "ham" in tables["recipes"].split(", ")
    assert {"ham_table4", "gam_table1"} <= set(tables["tables"].split(", "))


def test_reproduce_help_lists_the_tables(capsys):
    code, out, _ = run_cli(["reproduce", "--help"], capsys)
    assert code == 0
    assert "ham_table4" in " ".join(out.split()) and "attnzoo/experiments" not in out


def test_list_one_table(capsys):
    code, out, _ = run_cli(["list", "datasets"], capsys)
    assert (code, out) == (0, "datasets: cifar10, cifar100, digits, imagenet, stl10\n")


def test_python_m_attnzoo_list():
    result = subprocess.run(
        [sys.executable, "-m", "attnzoo", "list"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "resnet20" in result.stdout and "ham" in result.stdout
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ train and eval


def test_train_then_eval_then_resume(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--attention", "ham", "--out", run]
    argv += ["--epochs", "1", "--train-subset", "128", "--batch-size", "32", "--threads", "2"]
    code, out, err = run_cli(argv + ["--no-progress"], capsys)
    assert code == 0, err
    assert "done: test error" in out
    summary = json.loads((run / "summary.json").read_text())
    assert f"done: test error {summary['final_top1_err']:.2f}%" in out

    code, out, err = run_cli(["eval", "--run", run, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["test_top1_err"] == summary["final_top1_err"]
    assert result["images"] == 360

    # the run is finished: --resume reports it, training into it again is refused
    code, out, _ = run_cli(["train", "--resume", run], capsys)
    assert code == 0 and "done: test error" in out
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume")


# ------------------------------------------------------------------ user errors


def offline(*args, **kwargs):
    raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--model", "resnet21"], ["unknown model 'resnet21'", "choose one of", "resnet20"]),
        (["--attention", "hamm"], ["unknown attention 'hamm'", "choose one of", "ham", "cbam"]),
        (
            ["--dataset", "imagenet1k"],
            ["unknown dataset 'imagenet1k'", "cifar10, cifar100, digits"],
        ),
        (["--recipe", "hamm"], ["unknown recipe 'hamm'", "ham"]),
        (["--schedule", "step"], ["unknown schedule 'step'", "multistep"]),
        (["--epochs", "0"], ["epochs must be a positive int"]),
        (["--batch-size", "-1"], ["batch_size must be a positive int"]),
        (["--lr", "-0.1"], ["lr must be"]),
        (["--attention", "none", "--attention-kwargs", "{kernel_size: 3}"], ["no attention"]),
        (
            ["--attention", "ham", "--attention-kwargs", '{"bogus": 1}'],
            ["unknown option(s) bogus", "separation_rate"],
        ),
        (
            ["--attention", "ham", "--attention-kwargs", '{"separation_rate": 1.5}'],
            ["separation_rate must be in (0, 1)", "1.5"],
        ),
        (["--model-kwargs", '{"shortcut": "C"}'], ["unknown shortcut 'C'"]),
    ],
    ids=[
        "model",
        "attention",
        "dataset",
        "recipe",
        "schedule",
        "epochs-0",
        "batch-size",
        "negative-lr",
        "kwargs-without-attention",
        "unknown-attention-option",
        "separation-rate",
        "model-kwargs",
    ],
)
def test_train_user_errors(tmp_path, capsys, args, fragments):
    argv = ["train", "--dataset", "digits", *TINY, "--out", tmp_path / "run", *args]
    code, out, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    data = tmp_path / "data"
    data.mkdir()
    argv = ["train", "--dataset", "cifar10", "--data-dir", data, *TINY, "--out", tmp_path / "run"]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, str(data / "cifar10"), "download failed", "--data-dir")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "just-a-string", "{unclosed"])
def test_attention_kwargs_not_a_mapping(tmp_path, capsys, text):
    argv = ["train", "--dataset", "digits", "--attention", "ham", "--attention-kwargs", text]
    code, _, err = run_cli(argv + ["--out", tmp_path / "run"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--attention-kwargs" in err and "mapping" in err
    assert not (tmp_path / "run").exists()


def test_attention_kwargs_not_a_mapping_is_one_line(tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--attention", "ham", "--attention-kwargs", "[1, 2]"]
    code, _, err = run_cli(argv + ["--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "mapping")


def test_eval_of_a_missing_run(tmp_path, capsys):
    code, _, err = run_cli(["eval", "--run", tmp_path / "nope"], capsys)
    assert_one_line_error(code, err, "does not exist", str(tmp_path / "nope"))


def test_eval_of_a_directory_without_config(tmp_path, capsys):
    code, _, err = run_cli(["eval", "--run", tmp_path], capsys)
    assert_one_line_error(code, err, "not a run directory", "config.yaml")


def test_resume_with_model_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", tmp_path, "--model", "resnet32"], capsys)
    assert_one_line_error(code, err, "--resume continues a run as configured", "drop --model")


@pytest.mark.parametrize("option", [["--lr", "0.5"], ["--seed", "3"]])
def test_resume_refuses_every_run_option(tmp_path, capsys, option):
    code, _, err = run_cli(["train", "--resume", tmp_path / "run", *option], capsys)
    assert_one_line_error(code, err, f"drop {option[0]}")


def test_resume_of_a_missing_run(tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", tmp_path / "nope"], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_resume_of_a_garbage_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: digits\nepochs: 1\n")
    (run / "checkpoint.pt").write_bytes(b"hello world\n")
    code, _, err = run_cli(["train", "--resume", run], capsys)
    assert_one_line_error(code, err, "checkpoint")


def test_no_command(capsys):
    code, _, err = run_cli([], capsys)
    assert code == 2 and "usage:" in err


def test_failed_train_writes_nothing_in_the_working_directory(tmp_path, capsys, monkeypatch):
    # A failing run must not create runs/ in the working directory either.
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(["train", "--dataset", "digits", "--model", "nope"], capsys)
    assert code == 2 and not Path("runs").exists()
