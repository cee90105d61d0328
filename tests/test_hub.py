"""attnzoo.hub: ``attnzoo export RUN_DIR OUT_DIR`` and loading the export back.

One tiny real run (resnet20 + SE on 64 digits, one epoch, ~3 s) is exported; the export must
load back to the same logits, its config and card must describe the run, and a failed export
must leave nothing behind (or the previous export untouched).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo import hub
from attnzoo.cli import build_parser, main, train_config
from attnzoo.registry import create_model
from attnzoo.train import RunError, resolve_config, train
from attnzoo.train.checkpoint import load_weights

INPUT = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    cfg = resolve_config(
        "digits",
        dataset="digits",
        model="resnet20",
        attention="se",
        epochs=1,
        train_subset=64,
        test_subset=32,
        batch_size=32,
        threads=1,
        progress=False,
        compile=False,
    )
    out = tmp_path_factory.mktemp("runs") / "se"
    train(cfg, out, log=lambda message: None)
    return out


def run_model(run: Path) -> torch.nn.Module:
    """The run's model with its saved weights, as ``attnzoo eval`` builds it."""
    model = create_model("resnet20", num_classes=10, attention="se")
    load_weights(run / "model.safetensors", model)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_loads_back_to_the_same_logits(run, tmp_path):
    out = tmp_path / "hub" / "resnet20-se"
    config = hub.export_run(run, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert json.loads((out / "config.json").read_text()) == config
    expected = logits(run_model(run))
    loaded = hub.load_pretrained(out)
    assert torch.equal(logits(loaded), expected)
    by_hand = attnzoo.create_model("resnet20", attention="se", pretrained=out)
    assert by_hand.num_classes == 10 and torch.equal(logits(by_hand), expected)
    # A new head on the exported network: only the classifier is new.
    new_head = attnzoo.create_model("resnet20", attention="se", num_classes=5, pretrained=out)
    assert new_head.pretrained_report.new_classifier == ["fc.weight", "fc.bias"]
    assert leftovers(out.parent) == []


def test_config_has_what_create_model_needs(run, tmp_path):
    config = hub.export_run(run, tmp_path / "out")
    summary = json.loads((run / "summary.json").read_text())
    assert {k: config[k] for k in ("model", "num_classes", "attention", "dataset")} == {
        "model": "resnet20",
        "num_classes": 10,
        "attention": "se",
        "dataset": "digits",
    }
    assert config["attention_kwargs"] == {} and config["model_kwargs"] == {}
    assert config["attnzoo_version"] == attnzoo.__version__
    assert config["input_size"] == [3, 16, 16] and len(config["mean"]) == len(config["std"]) == 3
    assert config["results"]["final_top1_err"] == summary["final_top1_err"]
    assert config["results"]["params"] == summary["params"]
    assert "data_dir" not in config["train_config"]


def test_model_card_has_the_results_and_a_command_that_gives_the_config(run, tmp_path):
    out = tmp_path / "out"
    config = hub.export_run(run, out)
    card = (out / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: attnzoo\n")
    assert f"| top-1 error | {summary['final_top1_err']:.2f}% |" in card
    assert "hub.load_pretrained" in card and "```yaml" in card
    command = config["train_command"]
    assert command in card
    args = build_parser().parse_args(shlex.split(command)[1:])
    resolved, _ = train_config(args)
    original = attnzoo.train.engine.load_run_config(run)
    local = {"data_dir", "progress"}
    assert {k: v for k, v in resolved.to_dict().items() if k not in local} == {
        k: v for k, v in original.to_dict().items() if k not in local
    }


def test_cli_export_refuses_a_non_empty_out_dir_unless_forced(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(run), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    (out / "stale.txt").write_text("from before")
    assert main(["export", str(run), str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists()
    assert leftovers(tmp_path) == []


def test_an_empty_out_dir_is_used(run, tmp_path):
    (tmp_path / "empty").mkdir()
    hub.export_run(run, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_bad_run_dirs(run, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        hub.export_run(tmp_path / "absent", tmp_path / "out")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(RunError, match="not a run directory"):
        hub.export_run(tmp_path / "not_a_run", tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(RunError, match="has not finished.*--resume"):
        hub.export_run(unfinished, tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        hub.export_run(run, tmp_path / "file")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_weights_that_do_not_fit_the_config_are_refused(run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = (other / "config.yaml").read_text().replace("attention: se", "attention: eca")
    (other / "config.yaml").write_text(config)
    with pytest.raises(RunError, match="do not fit"):
        hub.export_run(other, tmp_path / "out")


def test_a_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    def broken_card(config):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        hub.export_run(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_forced_export_keeps_the_old_one(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    hub.export_run(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # the new export's rename into place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        hub.export_run(run, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_load_pretrained_refuses_a_directory_that_is_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="attnzoo export"):
        hub.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "resnet50"}')
    with pytest.raises(ValueError, match="no 'model' name"):
        hub.load_pretrained(tmp_path)
