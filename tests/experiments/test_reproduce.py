"""attnzoo reproduce / report on a tiny two-row table (digits, 1 epoch, 2 seeds)."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_table import TINY_TABLE

from attnzoo.cli import main
from attnzoo.experiments import spec as spec_module
from attnzoo.experiments.report import paired, report
from attnzoo.experiments.reproduce import planned_epochs, reproduce, slugify

TINY = TINY_TABLE
OPTIONS = dict(epochs=1, seeds=2, train_subset=96, threads=1)


@pytest.fixture
def tiny_table(tiny_table_root):
    return tiny_table_root / "runs"


def quiet(message: str) -> None:
    pass


def test_reproduce_resume_and_report(tiny_table, capsys):
    out = tiny_table
    first = reproduce("tiny", out=out, log=quiet, **OPTIONS)
    assert first["counts"] == {"trained": 4, "resumed": 0, "finished_before": 0}
    runs = {str(p.parent.relative_to(out)) for p in out.glob("tiny/*/seed*/summary.json")}
    assert runs == {
        "tiny/resnet20/seed0",
        "tiny/resnet20/seed1",
        "tiny/resnet20-se/seed0",
        "tiny/resnet20-se/seed1",
    }
    plan = (out / "tiny" / "plan.json").read_text()
    assert '"budget"' in plan and '"macs"' in plan

    again = reproduce("tiny", out=out, log=quiet, **OPTIONS)
    assert again["counts"] == {"trained": 0, "resumed": 0, "finished_before": 4}

    (out / "tiny" / "resnet20-se" / "seed1" / "summary.json").unlink()
    argv = ["reproduce", "tiny", "--epochs", "1", "--seeds", "2", "--train-subset", "96"]
    assert main([*argv, "--threads", "1", "--out", str(out)]) == 0
    assert "done: 0 trained, 1 resumed, 3 finished before" in capsys.readouterr().out
    assert (out / "tiny" / "resnet20-se" / "seed1" / "summary.json").is_file()

    # Another budget in the same directories is refused, not mixed in.
    with pytest.raises(ValueError, match="other settings: epochs 1 .now 2"):
        reproduce("tiny", out=out, log=quiet, **{**OPTIONS, "epochs": 2})

    assert main(["report", "tiny", "--out", str(out)]) == 0
    md, curves, errors = report("tiny", out=out)
    text = md.read_text()
    assert text in capsys.readouterr().out
    assert "| ResNet20 | 2 | digits |" in text and " ± " in text
    assert "verdict" in text and "baseline" in text
    assert any(v in text for v in ("inside the noise", "lower error than", "higher error than"))
    assert "1 of 15 (6.67%)" in text  # budget used: 1 epoch of the digits recipe's 15
    assert "| 4.00 |" in text  # the SE row's paper accuracy 96.0 as an error
    for png in (curves, errors):
        assert png.stat().st_size > 5000
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_paired_verdicts():
    from attnzoo.experiments.report import RowResult, RunResult
    from attnzoo.experiments.spec import Row

    row = Row("r", "resnet20", None, {}, {}, "digits", 10, 16, "digits", {})

    def result(errors):
        runs = [RunResult(k, "digits", 1, e, 0.0, 1, []) for k, e in enumerate(errors)]
        return RowResult(row, "r", runs)

    base = result([10.0, 12.0, 11.0])
    lower = paired(base, result([9.0, 11.1, 10.0]))  # differences -1.0, -0.9, -1.0
    assert lower["verdict"].startswith("lower error than baseline (95% CI -1.11 to -0.82)")
    assert paired(base, result([10.5, 11.5, 11.0]))["verdict"].startswith("inside the noise")
    # Differences -1, -2, -0.5: mean -1.17, std 0.76; 2 standard errors (0.88) would call it
    # a gain, Student's t for 2 degrees of freedom (4.30 standard errors, 1.90) does not.
    noisy = paired(base, result([9.0, 10.0, 10.5]))
    assert noisy["verdict"].startswith("inside the noise") and noisy["ci95"][1] > 0
    assert paired(base, result([13.0]))["verdict"] == "one seed: no verdict"


def test_budget_and_slugs():
    assert planned_epochs(200, budget=0.05) == 10
    assert planned_epochs(15, budget=0.01) == 1
    assert planned_epochs(200, epochs=3) == 3
    assert slugify("ResNet56 + HAM (lambda=0.8)") == "resnet56-ham-lambda-0-8"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["reproduce", "nope"], "unknown table 'nope'"),
        (["reproduce", "tiny", "--rows", "resnet21"], "unknown row 'resnet21'"),
        (["reproduce", "tiny", "--budget", "0"], "--budget must be a fraction"),
        (["reproduce", "tiny", "--budget", "1.5"], "--budget must be a fraction"),
        (["reproduce", "tiny", "--budget", "0.5", "--epochs", "2"], "not both"),
        (["reproduce", "tiny", "--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["report", "tiny"], "no finished runs of tiny"),
    ],
)
def test_cli_errors(tiny_table, capsys, argv, message):
    assert main([*argv, "--out", str(tiny_table)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnzoo: error:") and message in err


def test_row_on_an_unavailable_dataset(tiny_table, capsys):
    (spec_module.TABLE_DIR / "far.yaml").write_text(
        TINY.replace("dataset: digits", "dataset: svhn")
    )
    assert main(["reproduce", "far", "--out", str(tiny_table)]) == 2
    err = capsys.readouterr().err
    assert "on dataset 'svhn', which is not available" in err and "cifar10" in err


def test_model_recipe_and_test_subset_overrides(tiny_table):
    out = tiny_table
    options = dict(OPTIONS, seeds=1, test_subset=50, model="resnet32", recipe="cosine")
    result = reproduce(
        "tiny",
        rows=["1"],
        out=out,
        epochs=1,
        **{k: v for k, v in options.items() if k != "epochs"},
        log=quiet,
    )
    assert result["counts"]["trained"] == 1
    entry = result["rows"]["resnet20"]
    assert entry["model"] == "resnet32" and entry["recipe"] == "cosine"
    assert entry["recipe_epochs"] == 200 and entry["test_subset"] == 50
    from attnzoo.train.checkpoint import read_config

    cfg = read_config(out / "tiny" / "resnet20" / "seed0")
    assert (cfg["model"], cfg["recipe"], cfg["test_subset"]) == ("resnet32", "cosine", 50)
    md, _, _ = report("tiny", out=out)
    text = md.read_text()
    assert "1 of 200" in text  # the budget is read against the recipe actually used
    assert "first 50 test images" in text and "instead of the paper's model" in text
    # The same directory with another model is refused.
    with pytest.raises(ValueError, match="other settings"):
        reproduce(
            "tiny",
            rows=["1"],
            out=out,
            epochs=1,
            seeds=1,
            model="resnet20",
            recipe="cosine",
            test_subset=50,
            train_subset=96,
            threads=1,
            log=quiet,
        )


def test_speed_settings_do_not_make_a_finished_run_foreign(tiny_table):
    """A run that recorded its resolved compile choice (or another thread count) is still done."""
    out = tiny_table
    options = dict(OPTIONS, seeds=1)
    reproduce("tiny", rows=["1"], out=out, log=quiet, **options)
    config = out / "tiny" / "resnet20" / "seed0" / "config.yaml"
    text = config.read_text()
    assert "compile:" in text
    config.write_text(
        "\n".join(
            "compile: false" if line.startswith("compile:") else line for line in text.splitlines()
        )
        + "\n"
    )
    again = reproduce("tiny", rows=["1"], out=out, log=quiet, **{**options, "threads": 2})
    assert again["counts"] == {"trained": 0, "resumed": 0, "finished_before": 1}
