"""``attnzoo visualize`` (attnzoo/viz/): the PNGs, their sizes, Grad-CAM values, errors.

Three tiny digits runs (resnet20 without attention, with HAM, with CBAM; one epoch on 128
images) are trained once for the module; the pictures need trained weights, not good ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from attnzoo.cli import main
from attnzoo.data import load_dataset
from attnzoo.train import resolve_config, train
from attnzoo.viz import load_run, normalise, pick_images
from attnzoo.viz.figures import BAR_CELL, CURVES_SIZE, DPI, grid_pixels
from attnzoo.viz.gradcam import grad_cam

IMAGES = 3
ATTENTIONS = ("none", "ham", "cbam")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("viz_runs")
    paths = {}
    for name in ATTENTIONS:
        cfg = resolve_config(
            "digits",
            model="resnet20",
            attention=None if name == "none" else name,
            dataset="digits",
            epochs=1,
            warmup_epochs=0,  # the digits recipe warms up for one epoch
            train_subset=128,
            threads=1,
            progress=False,
        )
        paths[name] = root / name
        train(cfg, paths[name], log=lambda message: None)
    return paths


@pytest.fixture(scope="module")
def pictures(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("viz_out")
    argv = ["visualize", "--images", str(IMAGES), "--out", str(out), "--seed", "3"]
    for name in ATTENTIONS:
        argv += ["--run", str(runs[name])]
    assert main(argv) == 0
    return out


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()  # a truncated file fails here
        return image.size


def test_every_png_is_written_at_its_grid_size(pictures):
    out = pictures
    # gradcam: the image, then one column per run.
    assert size_of(out / "gradcam.png") == grid_pixels(IMAGES, 1 + len(ATTENTIONS))
    # attention maps: the image, HAM's two group maps and CBAM's M_s for each of 3 stages.
    assert size_of(out / "attention_maps.png") == grid_pixels(IMAGES, 1 + 2 * 3 + 3)
    # channel weights: a row for HAM and one for CBAM, a bar plot per stage.
    assert size_of(out / "channel_weights.png") == grid_pixels(2, 3, BAR_CELL, header=0)
    curves = (round(CURVES_SIZE[0] * DPI), round(CURVES_SIZE[1] * DPI))
    for name in ATTENTIONS:
        assert size_of(out / f"curves_{name}.png") == curves
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_gradcam_heatmaps_are_in_unit_range(runs):
    data = load_dataset("digits")
    indices = pick_images(data, IMAGES, seed=3)
    assert list(indices) == list(pick_images(data, IMAGES, seed=3))  # the same for every run
    x = normalise(data, data.test.images[indices])
    classes = [int(c) for c in data.test.labels[indices]]
    for name in ("none", "ham"):
        run = load_run(runs[name], data)
        for method in ("gradcam", "gradcam++"):
            heat = grad_cam(run.model, x, classes, method)
            assert heat.shape == (IMAGES, 16, 16)
            assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
            assert heat.max() > 0  # not a blank map
        assert all(p.grad is None for p in run.model.parameters())


def test_a_run_without_attention_shows_only_in_gradcam(runs, tmp_path, capsys):
    out = tmp_path / "viz"
    assert main(["visualize", "--run", str(runs["none"]), "--images", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["curves_none.png", "gradcam.png"]
    assert size_of(out / "gradcam.png") == grid_pixels(1, 2)
    printed = capsys.readouterr().out
    assert "skipped attention_maps.png" in printed and "skipped channel_weights.png" in printed


def test_default_out_is_inside_the_first_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["cbam"], run)
    assert main(["visualize", "--run", str(run), "--images", "1", "--method", "gradcam++"]) == 0
    assert (run / "viz" / "gradcam.png").is_file()
    assert (run / "viz" / "attention_maps.png").is_file()


def _other_dataset(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cifar_run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["dataset"] = "cifar10"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def _no_weights(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no_weights"
    copy.mkdir()
    shutil.copy(run / "config.yaml", copy)
    return copy


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "does not exist"),
        ("no_weights", "has no model.safetensors"),
        ("zero_images", "--images must be a positive int"),
        ("too_many_images", "at most 32"),
        ("datasets", "different datasets"),
        ("method", "unknown --method"),
    ],
)
def test_errors_are_one_line(runs, tmp_path, capsys, case, fragment):
    run = str(runs["none"])
    argv = {
        "missing": ["--run", str(tmp_path / "nope"), "--images", "2"],
        "no_weights": ["--run", str(_no_weights(runs["none"], tmp_path)), "--images", "2"],
        "zero_images": ["--run", run, "--images", "0"],
        "too_many_images": ["--run", run, "--images", "400"],
        "datasets": ["--run", run, str(_other_dataset(runs["ham"], tmp_path)), "--images", "1"],
        "method": ["--run", run, "--images", "1", "--method", "cam"],
    }[case]
    out = tmp_path / "out"
    assert main(["visualize", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnzoo: error: ") and fragment in err, err
    assert not out.exists()


def test_threads_flag_is_checked(runs, capsys):
    threads = torch.get_num_threads()
    assert main(["visualize", "--run", str(runs["none"]), "--images", "1", "--threads", "0"]) == 2
    assert torch.get_num_threads() == threads
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_an_unwritable_out_fails_before_the_work(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["visualize", "--run", str(runs["none"]), "--images", "1", "--out", str(blocker)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to --out" in err, err


def test_a_constant_map_is_labelled_constant_not_given_a_range():
    """A dead gate (a HAM spatial map at 0.5 everywhere) must not look like a plotting fault."""
    import matplotlib

    matplotlib.use("Agg")
    from attnzoo.viz.figures import MapColumn, attention_figure

    images = np.zeros((2, 8, 8, 3), dtype=np.float32)
    varied = np.linspace(0, 1, 2 * 64, dtype=np.float32).reshape(2, 8, 8)
    columns = [
        MapColumn("run\ndead gate", np.full((2, 8, 8), 0.5, dtype=np.float32)),
        MapColumn("run\nlive gate", varied),
    ]
    fig = attention_figure(images, [0, 1], columns)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "constant map: 0.5 everywhere" in texts
    assert "range 0 .. 1" in texts
    assert not any(t.startswith("range 0.5") for t in texts)
