"""Folder datasets (attnzoo/data/folder.py): ImageNet-style class folders and FolderLoader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms

from attnzoo.cli import main
from attnzoo.data import (
    DataError,
    FolderDataset,
    FolderLoader,
    ImageDataset,
    LoaderSettings,
    Split,
    load_dataset,
)
from attnzoo.data.folder import IMAGENET_MEAN, IMAGENET_STD
from attnzoo.train import resolve_config, resume, train

CLASSES = ["ant", "bee", "cat"]


def write_folders(folder: Path, train_per_class: int = 4, val_per_class: int = 2) -> None:
    """Tiny random PNGs of odd sizes in train/<class>/ and val/<class>/ (and one JPEG)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in CLASSES:
            (folder / split / c).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(12, 40, size=2)
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                suffix = "jpg" if (split, c, i) == ("train", "bee", 0) else "png"
                Image.fromarray(pixels).save(folder / split / c / f"{i}.{suffix}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data root with <root>/imagenet/{train,val}: 3 classes, 12 train and 6 val images."""
    write_folders(tmp_path / "imagenet")
    return tmp_path


def loaders(data: FolderDataset, **kwargs) -> tuple[FolderLoader, FolderLoader]:
    options = dict(batch_size=4, test_batch_size=4, image_size=32) | kwargs
    return data.make_loaders(LoaderSettings(**options))


def collect(loader: FolderLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------ the dataset


def test_scan_reports_classes_and_size(root):
    data = load_dataset("imagenet", root)
    assert isinstance(data, FolderDataset)
    assert data.folder == root / "imagenet"
    assert (data.classes, data.num_classes, data.image_size) == (CLASSES, 3, (224, 224))
    assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert len(data.train_samples) == 12 and len(data.test_samples) == 6
    assert [c for _, c in data.test_samples] == [0, 0, 1, 1, 2, 2]


def test_data_dir_may_be_the_dataset_folder_itself(root):
    data = load_dataset("imagenet", root / "imagenet")
    assert data.folder == root / "imagenet" and data.num_classes == 3


def test_default_size_is_224_with_standard_eval_transform(root):
    data = load_dataset("imagenet", root)
    train, test = data.make_loaders(LoaderSettings(batch_size=4, test_batch_size=4))
    x, y = next(iter(train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = next(iter(test))
    assert x.shape == (4, 3, 224, 224)
    # The reference: torchvision's own Resize(256) + CenterCrop(224) + Normalize.
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    for k in range(4):
        path, label = data.test_samples[k]
        expected = reference(Image.open(path).convert("RGB"))
        torch.testing.assert_close(x[k], expected, atol=1e-5, rtol=1e-5)
        assert y[k] == label


def test_training_batches_are_random_crops_of_the_class_images(root):
    data = load_dataset("imagenet", root)
    train, _ = loaders(data)
    x, y = collect(train)
    assert x.shape == (12, 3, 32, 32) and len(train) == 3
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # every image once
    pixels = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(
        1, 3, 1, 1
    )
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_channels_last(root):
    train, test = loaders(load_dataset("imagenet", root), channels_last=True)
    for loader in (train, test):
        x, _ = next(iter(loader))
        assert x.is_contiguous(memory_format=torch.channels_last)


def test_subsets_have_every_class(root):
    train, test = loaders(load_dataset("imagenet", root), train_subset=8, test_subset=4)
    assert (train.num_samples, test.num_samples) == (8, 4)
    _, y = collect(train)
    assert set(y.tolist()) == {0, 1, 2}


# ------------------------------------------------------------------ determinism, sharding


def test_same_seed_same_batches_any_worker_count(root):
    data = load_dataset("imagenet", root)
    a = collect(loaders(data, seed=3, workers=0)[0])
    b = collect(loaders(data, seed=3, workers=2)[0])
    c = collect(loaders(data, seed=4, workers=0)[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])


def test_epochs_differ_and_the_main_random_state_is_untouched(root):
    train, _ = loaders(load_dataset("imagenet", root))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, second = collect(train), collect(train)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("split", ["train", "test"])
def test_two_ranks_split_every_batch_of_one_process(root, split):
    data = load_dataset("imagenet", root)
    # test: 6 images in batches of 4 and a short batch of 2; batch 3 would leave rank 1
    # nothing in a batch of 1, so use batch 5: a last batch of 1 image, rank 0 gets none.
    kwargs = dict(batch_size=4, test_batch_size=5, seed=1)
    pick = 0 if split == "train" else 1
    one = loaders(data, **kwargs)[pick]
    ranks = [loaders(data, **kwargs, rank=r, world_size=2)[pick] for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1])
    seen = []
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks, strict=True):
        torch.testing.assert_close(torch.cat([x0, x1]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([y0, y1]), y)
        seen += [y0.numel(), y1.numel()]
    assert sum(seen) == one.num_samples - (len(data.train_samples) % 4 if pick == 0 else 0)
    if split == "test":
        assert seen[-2:] == [0, 1]  # the empty share of a short last batch is an empty batch


# ------------------------------------------------------------------ resume


def test_resume_inside_an_epoch_continues_exactly(root):
    data = load_dataset("imagenet", root)
    reference, _ = loaders(data, seed=5)
    collect(reference)  # epoch 1
    expected = list(reference)  # epoch 2
    third = collect(reference)  # epoch 3

    run, _ = loaders(data, seed=5)
    collect(run)
    it = iter(run)
    next(it)
    state = run.state_dict()
    assert state["position"] == 1 and set(state) == {"generator", "position"}
    del it

    resumed, _ = loaders(data, seed=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["position"] == 1  # a loaded state reads back unchanged
    rest = list(resumed)
    assert len(rest) == len(expected) - 1
    for (x, y), (xe, ye) in zip(rest, expected[1:], strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)
    assert resumed.state_dict()["position"] == 0
    for a, b in zip(collect(resumed), third, strict=True):
        assert torch.equal(a, b)


def test_resume_between_epochs(root):
    data = load_dataset("imagenet", root)
    reference, _ = loaders(data, seed=2)
    collect(reference)
    state = reference.state_dict()
    assert state["position"] == 0
    resumed, _ = loaders(data, seed=2)
    resumed.load_state_dict(state)
    for a, b in zip(collect(resumed), collect(reference), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("position", [-1, 3, 1.0, True])
def test_impossible_state_is_refused(root, position):
    train, _ = loaders(load_dataset("imagenet", root))
    with pytest.raises(ValueError, match="position"):
        train.load_state_dict({"generator": train.generator.get_state(), "position": position})


def test_state_of_another_generator_is_refused(root):
    train, _ = loaders(load_dataset("imagenet", root))
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        train.load_state_dict({"generator": torch.zeros(3, dtype=torch.uint8), "position": 1})


# ------------------------------------------------------------------ errors


def test_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("imagenet", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "imagenet" / "train") in message
    assert "train/<class>" in message and "--data-dir" in message
    assert "\n" not in message


def test_missing_val_folder(root):
    (root / "imagenet" / "val").rename(root / "imagenet" / "validation")
    with pytest.raises(DataError, match="val"):
        load_dataset("imagenet", root)


def test_class_mismatch_names_the_classes(root):
    (root / "imagenet" / "val" / "cat").rename(root / "imagenet" / "val" / "cow")
    with pytest.raises(DataError) as info:
        load_dataset("imagenet", root)
    message = str(info.value)
    assert "only in train: cat" in message and "only in val: cow" in message


def test_empty_class_folder(root):
    (root / "imagenet" / "train" / "dog").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset("imagenet", root)
    assert "dog" in str(info.value) and "at least one image" in str(info.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_one_line_naming_the_file(root, workers):
    bad = root / "imagenet" / "val" / "bee" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _, test = loaders(load_dataset("imagenet", root), workers=workers)
    with pytest.raises(DataError) as info:
        collect(test)
    message = str(info.value)
    assert str(bad) in message and "replace or delete" in message
    assert "\n" not in message and "Traceback" not in message


def test_in_memory_datasets_refuse_an_image_size():
    images = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    split = Split(images, np.arange(8) % 2)
    data = ImageDataset("tiny", split, split, 2, (0.5,) * 3, (0.25,) * 3, pad=0, flip=False)
    data.make_loaders(LoaderSettings(batch_size=4, test_batch_size=4, image_size=16))  # its own
    with pytest.raises(ValueError, match="--image-size"):
        data.make_loaders(LoaderSettings(batch_size=4, test_batch_size=4, image_size=32))


# ------------------------------------------------------------------ training on folders


def metrics_without_timing(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and k != "images_per_s"} for r in rows]


def test_training_resumes_exactly_inside_an_epoch(root, tmp_path, monkeypatch, crash_after_saves):
    # 12 images, batch 4: 3 steps per epoch; checkpoints every 2 steps save at steps 2 (mid
    # epoch 1), 3 (end of epoch 1), 4 (mid epoch 2). Crash after the third, then resume.
    def config(**overrides):
        values = dict(
            dataset="imagenet", data_dir=str(root), model="resnet20", epochs=2, batch_size=4,
            image_size=32, workers=1, threads=1, progress=False, recipe="digits",
        )  # fmt: skip
        return resolve_config(values.pop("recipe"), **(values | overrides))

    reference = tmp_path / "reference"
    train(config(), reference, log=lambda m: None)
    saves = crash_after_saves(3, KeyboardInterrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(checkpoint_every_steps=2, workers=0), run, log=lambda m: None)
    monkeypatch.undo()
    assert saves == [2, 3, 4]
    resume(run, log=lambda m: None)
    assert (run / "model.safetensors").read_bytes() == (
        reference / "model.safetensors"
    ).read_bytes()
    assert metrics_without_timing(run) == metrics_without_timing(reference)


def test_cli_train_and_eval_on_folders(root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "imagenet", "--data-dir", root, "--model", "resnet18"]
    argv += ["--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "1"]
    argv += ["--threads", "2", "--no-progress", "--out", out]
    assert main([str(a) for a in argv]) == 0
    assert "12 training images" in capsys.readouterr().out
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["workers"], config["image_size"]) == (1, 32)
    assert main(["eval", "--run", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 6


def test_cli_corrupt_image_is_one_line(root, tmp_path, capsys):
    (root / "imagenet" / "train" / "ant" / "0.png").write_bytes(b"garbage")
    argv = ["train", "--dataset", "imagenet", "--data-dir", root, "--model", "resnet20"]
    argv += ["--epochs", "1", "--batch-size", "12", "--image-size", "16", "--workers", "0"]
    argv += ["--threads", "1", "--no-progress", "--out", tmp_path / "run"]
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnzoo: error: cannot read image ")
    assert "0.png" in lines[0]


def test_cli_missing_folder_is_one_line(tmp_path, capsys):
    argv = ["train", "--dataset", "imagenet", "--data-dir", tmp_path, "--epochs", "1"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "run"]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "imagenet: no folder" in lines[0]
    assert not (tmp_path / "run").exists()
