"""``attnzoo train`` overrides (attnzoo/cli/train.py): every recipe key has a flag and can be
set with ``--set key=value``; a recipe warmup that does not fit a short run is scaled, and
``--precision`` picks the autocast."""

from __future__ import annotations

import json

import pytest
import yaml

from attnzoo.cli import build_parser, main, train_config
from attnzoo.train import list_recipes, load_recipe
from attnzoo.train.config import RECIPE_DIR, TrainConfig


def config_of(*argv: str, notes: list | None = None) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *argv]), notes)[0]


def recipe_keys() -> list[str]:
    return sorted({k for name in list_recipes() for k in load_recipe(name)})


def other_value(key: str, value):
    """A valid value for ``key`` that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if key == "milestones":
        return [0.25, 0.5]
    if key == "schedule":
        return "constant" if value != "constant" else "cosine"
    if key == "optimizer":
        return "adamw" if value != "adamw" else "sgd"
    if key == "auto_augment":
        return "randaugment" if value != "randaugment" else "trivialaugment"
    if key == "epochs":
        return value + 3
    if key == "batch_size":
        return value * 2
    if key == "warmup_epochs":
        return 0.5 if value != 0.5 else 0.25
    return value * 0.5 if value else 0.125


def flag_argv(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def test_the_recipes_have_keys():
    assert {"lr", "momentum", "nesterov", "warmup_epochs", "milestones", "gamma"} <= set(
        recipe_keys()
    )


@pytest.mark.parametrize("recipe", list_recipes())
@pytest.mark.parametrize("key", recipe_keys())
def test_every_recipe_key_has_a_flag_and_a_set(recipe, key):
    values = load_recipe(recipe)
    if key not in values:
        pytest.skip(f"{recipe} has no {key}")
    new = other_value(key, values[key])
    base = ["--recipe", recipe, "--dataset", "digits"]
    if key == "warmup_epochs":
        base += ["--epochs", "20"]
    by_flag = config_of(*base, *flag_argv(key, new))
    by_set = config_of(*base, "--set", f"{key}={json.dumps(new)}")
    assert getattr(by_flag, key) == new and getattr(by_set, key) == new
    # nothing else moved
    untouched = config_of(*base)
    for cfg in (by_flag, by_set):
        changed = {k for k, v in cfg.to_dict().items() if v != getattr(untouched, k)}
        assert changed == {key}, changed


def test_set_reaches_keys_without_a_flag_and_reads_yaml():
    cfg = config_of(
        "--dataset", "digits", "--set", "model_kwargs={shortcut: B}", "--set", "test_subset=50"
    )
    assert cfg.model_kwargs == {"shortcut": "B"} and cfg.test_subset == 50


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--set", "lr"], "--set takes KEY=VALUE"),
        (["--set", "=3"], "--set takes KEY=VALUE"),
        (["--set", "lr=0.1", "--set", "lr=0.2"], "--set lr given twice"),
        (["--lr", "0.1", "--set", "lr=0.2"], "given both as a flag and with --set"),
        (["--set", "recipe=digits"], "--recipe"),
        (["--set", "warmpu_epochs=1"], "unknown config key(s) warmpu_epochs"),
        (["--set", "momentum=fast"], "momentum must be a finite number"),
        (["--warmup-epochs", "3", "--epochs", "2"], "warmup_epochs (3.0) must be < epochs (2)"),
    ],
)
def test_bad_overrides_are_one_line_errors(argv, fragment, capsys, tmp_path):
    code = main(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err
    assert not (tmp_path / "r").exists()


def test_recipe_warmup_is_scaled_to_a_short_run():
    recipe = yaml.safe_load((RECIPE_DIR / "digits.yaml").read_text())
    assert recipe["warmup_epochs"] == 1 and recipe["epochs"] == 15
    notes: list[str] = []
    cfg = config_of("--recipe", "digits", "--dataset", "digits", "--epochs", "1", notes=notes)
    assert cfg.warmup_epochs == pytest.approx(1 / 15)
    assert len(notes) == 1 and "warming up for 0.0667 epochs" in notes[0]
    notes.clear()  # a run the warmup fits keeps it as it is, silently
    assert config_of("--recipe", "digits", "--epochs", "2", notes=notes).warmup_epochs == 1
    assert notes == []
    assert (
        config_of("--recipe", "digits", "--epochs", "1", "--warmup-epochs", "0").warmup_epochs == 0
    )


def test_one_epoch_smoke_run_of_the_digits_recipe(tmp_path, capsys):
    """The first thing people try (issue 11): it failed on the recipe's warmup."""
    run = tmp_path / "run"
    code = main(
        ["train", "--model", "resnet20", "--attention", "ham", "--dataset", "digits",
         "--recipe", "digits", "--epochs", "1", "--train-subset", "64", "--no-progress",
         "--precision", "fp32", "--out", str(run)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "note: the digits recipe's 1 warmup epoch would not fit a 1-epoch run" in out
    assert "1 epoch ->" in out and "1 epochs" not in out
    assert "precision fp32" in out
    assert json.loads((run / "summary.json").read_text())["precision"] == "fp32"


def test_precision_flag_and_its_refusals(capsys, tmp_path):
    assert config_of("--precision", "bf16").precision == "bf16"
    assert config_of().precision == "auto"
    code = main(["train", "--dataset", "digits", "--precision", "fp16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "fp16 needs a CUDA device" in err


def test_worker_argv_repeats_list_and_append_options():
    from attnzoo.cli import worker_argv

    args = build_parser().parse_args(
        ["train", "--milestones", "0.5", "0.75", "--set", "gamma=0.1", "--set", "seed=3",
         "--nproc", "2"]
    )  # fmt: skip
    argv = worker_argv(args)
    assert argv[argv.index("--milestones") :][:3] == ["--milestones", "0.5", "0.75"]
    assert "--set=gamma=0.1" in argv and "--set=seed=3" in argv and "--nproc" not in argv
    again = build_parser().parse_args(argv)
    assert again.milestones == [0.5, 0.75] and again.overrides == ["gamma=0.1", "seed=3"]
