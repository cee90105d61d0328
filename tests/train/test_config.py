"""Training configuration (attnzoo/train/config.py): recipes, overrides, validation."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from attnzoo.train import TrainConfig, list_recipes, load_recipe, resolve_config


def test_ham_recipe_is_the_papers():
    cfg = resolve_config("ham")
    assert cfg.recipe == "ham"
    assert cfg.epochs == 200 and cfg.batch_size == 128
    assert cfg.lr == 0.1 and cfg.momentum == 0.9 and cfg.nesterov is False
    assert cfg.weight_decay == 5e-4
    assert cfg.schedule == "multistep"
    assert cfg.milestones == [0.3, 0.6, 0.8] and cfg.gamma == 0.2
    assert cfg.warmup_epochs == 0


def test_list_recipes():
    assert {"ham", "cosine", "digits"} <= set(list_recipes())
    assert list_recipes() == sorted(list_recipes())


def test_overrides_win_and_none_means_unset():
    cfg = resolve_config("ham", epochs=10, lr=0.05, batch_size=None, attention="ham")
    assert cfg.epochs == 10 and cfg.lr == 0.05 and cfg.batch_size == 128
    assert cfg.attention == "ham"


def test_recipe_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 7\nlr: 0.3\nschedule: constant\n")
    cfg = resolve_config(str(path))
    assert (cfg.epochs, cfg.lr, cfg.schedule, cfg.recipe) == (7, 0.3, "constant", str(path))


def test_config_round_trips_through_yaml():
    cfg = resolve_config(
        "digits", dataset="digits", attention="ham", attention_kwargs={"kernel_size": 3}
    )
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------ unknown names


@pytest.mark.parametrize(
    "call,valid",
    [
        (lambda: resolve_config("hamm"), ["cosine", "digits", "ham"]),
        (lambda: load_recipe("nope"), ["cosine", "digits", "ham"]),
        (lambda: resolve_config("ham", schedule="step"), ["multistep", "cosine", "constant"]),
        (lambda: resolve_config("ham", model="resnet21"), ["resnet20", "resnet56"]),
        (lambda: resolve_config("ham", attention="hamm"), ["cbam", "eca", "ham", "se"]),
        (lambda: resolve_config("ham", dataset="imagenet1k"), ["cifar10", "cifar100", "digits"]),
    ],
    ids=["recipe", "recipe-direct", "schedule", "model", "attention", "dataset"],
)
def test_unknown_names_list_the_valid_ones(call, valid):
    with pytest.raises(ValueError, match="unknown") as info:
        call()
    message = str(info.value)
    assert "choose one of" in message
    for name in valid:
        assert name in message


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown config key\\(s\\) epoch, learning_rate") as info:
        resolve_config("ham", epoch=3, learning_rate=0.1)
    assert "valid keys:" in str(info.value) and "epochs" in str(info.value)


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 5\nmomentun: 0.9\n")
    with pytest.raises(ValueError, match="momentun"):
        resolve_config(str(path))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "epochs: [1\n"])
def test_recipe_file_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=str(path)):
        load_recipe(str(path))


def test_missing_recipe_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read recipe"):
        load_recipe(str(tmp_path / "absent.yaml"))


def test_from_dict_needs_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        TrainConfig.from_dict([("epochs", 3)])


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lr": -0.1}, "lr must be a finite number >= 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"lr": "0.1"}, "lr must be a finite number"),
        ({"momentum": -0.9}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"gamma": True}, "gamma"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"epochs": -3}, "epochs must be a positive int"),
        ({"epochs": 2.5}, "epochs must be a positive int"),
        ({"epochs": True}, "epochs must be a positive int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"milestones": [0.3, 1.5]}, "milestones must be fractions"),
        ({"milestones": [0.0]}, "milestones must be fractions"),
        ({"milestones": [1]}, "milestones must be fractions"),
        ({"milestones": 0.5}, "milestones must be fractions"),
        ({"milestones": [60, 120]}, "milestones must be fractions"),
        ({"warmup_epochs": 200}, "warmup_epochs"),
        ({"train_subset": 0}, "train_subset must be a positive int"),
        ({"threads": 0}, "threads must be a positive int"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"attention": "ham", "attention_kwargs": [1, 2]}, "attention_kwargs must be a mapping"),
        ({"model_kwargs": "shortcut=B"}, "model_kwargs must be a mapping"),
        ({"attention_kwargs": {"kernel_size": 3}}, "no attention selected"),
    ],
)
def test_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_config("ham", **overrides)


def test_unknown_attention_option_is_caught_by_validation():
    with pytest.raises(ValueError, match="reduction_ratio"):
        resolve_config("ham", attention="ham", attention_kwargs={"reduction_ratio": 4})


def test_validate_returns_the_config():
    cfg = TrainConfig(dataset="digits")
    assert cfg.validate() is cfg
