"""Named datasets (attnzoo/data/datasets.py): data root, digits, CIFAR files and download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torchvision

from attnzoo.data import DataError, list_datasets, load_dataset, load_split, save_split
from attnzoo.data.datasets import CIFAR_STATS, data_root

# ------------------------------------------------------------------ data root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNZOO_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_data_root_precedence(clean_env, tmp_path):
    home = tmp_path / "home"
    assert data_root() == home / ".cache" / "attnzoo"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "attnzoo"
    clean_env.setenv("ATTNZOO_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root(str(tmp_path / "flag")) == tmp_path / "flag"


def test_data_root_expands_user(clean_env, tmp_path):
    home = tmp_path / "home"
    assert data_root("~/data") == home / "data"
    clean_env.setenv("ATTNZOO_DATA", "~/env-data")
    assert data_root() == home / "env-data"


def test_empty_settings_fall_through(clean_env, tmp_path):
    clean_env.setenv("ATTNZOO_DATA", "")
    clean_env.setenv("XDG_CACHE_HOME", "")
    assert data_root("") == tmp_path / "home" / ".cache" / "attnzoo"


def test_env_root_is_used_by_load_dataset(clean_env, tiny_cifar_root):
    clean_env.setenv("ATTNZOO_DATA", str(tiny_cifar_root))
    assert load_dataset("cifar10").train.images.shape[0] == 64


# ------------------------------------------------------------------ registry


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagenet", "stl10"]


@pytest.mark.parametrize("name", ["cifar", "CIFAR10", "stl-10", ""])
def test_unknown_dataset_lists_valid_names(name):
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset(name)
    assert "choose one of: cifar10, cifar100, digits, imagenet, stl10" in str(info.value)


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_layout(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    for split in (digits.train, digits.test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (16, 16, 3)
        assert split.labels.dtype == np.int64 and split.labels.shape == split.images.shape[:1]
        # grey copied to RGB
        assert np.array_equal(split.images[..., 0], split.images[..., 1])
        assert np.array_equal(split.images[..., 0], split.images[..., 2])
    assert len(digits.train.labels) + len(digits.test.labels) == 1797
    assert digits.image_size == (16, 16)
    assert digits.pad == 2 and digits.flip is False
    assert digits.train.images.max() > 200  # the 0..16 ink range is scaled up to 0..255


def test_digits_statistics_are_those_of_the_training_images(digits):
    grey = digits.train.images[..., 0].astype(np.float64) / 255
    np.testing.assert_allclose(digits.mean, [grey.mean()] * 3, rtol=1e-12)
    np.testing.assert_allclose(digits.std, [grey.std()] * 3, rtol=1e-12)


def test_digits_split_is_fixed_and_stratified(digits):
    from sklearn.datasets import load_digits

    again = load_dataset("digits")
    for a, b in ((digits.train, again.train), (digits.test, again.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    per_class = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(digits.test.labels, minlength=10)
    train_counts = np.bincount(digits.train.labels, minlength=10)
    np.testing.assert_array_equal(test_counts + train_counts, per_class)
    assert len(digits.test.labels) == 360  # 20%
    # every class is split about 80/20 (a random split would be off by up to ~10 images)
    assert np.all(np.abs(test_counts - 0.2 * per_class) <= 1.5)


def test_digits_images_are_the_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    # Bilinear 2x upsampling keeps each image's mean ink close to the 8x8 source; match each
    # sklearn image to its upsampled copy by label and mean, independently of the split.
    bunch = load_digits()
    source_means = np.sort(bunch.images.reshape(len(bunch.images), -1).mean(1) * 255 / 16)
    ours = np.concatenate([digits.train.images, digits.test.images])[..., 0]
    our_means = np.sort(ours.reshape(len(ours), -1).astype(np.float64).mean(1))
    assert np.abs(our_means - source_means).max() < 12


# ------------------------------------------------------------------ CIFAR from files


def test_cifar10_from_generated_files(tiny_cifar_root):
    data = load_dataset("cifar10", tiny_cifar_root)
    expected = load_split(tiny_cifar_root / "cifar10" / "train.npz")
    np.testing.assert_array_equal(data.train.images, expected.images)
    np.testing.assert_array_equal(data.train.labels, expected.labels)
    assert data.test.images.shape == (32, 32, 32, 3)
    assert data.num_classes == 10 and data.image_size == (32, 32)
    assert (data.mean, data.std) == CIFAR_STATS["cifar10"]
    assert data.pad == 4 and data.flip is True


def test_cifar_labels_are_checked_against_the_class_count(tiny_cifar_root):
    folder = tiny_cifar_root / "cifar10"
    split = load_split(folder / "test.npz")
    save_split(folder / "test.npz", split.images, split.labels + 10)
    with pytest.raises(DataError, match="labels must lie in \\[0, 10\\)") as info:
        load_dataset("cifar10", tiny_cifar_root)
    assert "test.npz" in str(info.value)


def test_cifar_train_and_test_sizes_must_agree(tiny_cifar_root):
    folder = tiny_cifar_root / "cifar10"
    save_split(folder / "test.npz", np.zeros((4, 28, 28, 3), np.uint8), np.arange(4))
    with pytest.raises(DataError, match="train images are"):
        load_dataset("cifar10", tiny_cifar_root)


# ------------------------------------------------------------------ download (fake torchvision)


def fake_cifar(n_train: int, n_test: int, num_classes: int = 10):
    calls = []

    class FakeCIFAR:
        def __init__(self, root, train=True, download=False):
            calls.append((Path(root), train, download))
            n = n_train if train else n_test
            rng = np.random.default_rng(int(train))
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % num_classes for i in range(n)]
            self.classes = [f"class{k}" for k in range(num_classes)]

    return FakeCIFAR, calls


@pytest.mark.parametrize(
    "name,cls_name,classes", [("cifar10", "CIFAR10", 10), ("cifar100", "CIFAR100", 100)]
)
def test_download_writes_the_splits(monkeypatch, tmp_path, name, cls_name, classes):
    fake, calls = fake_cifar(120, 30, classes)
    monkeypatch.setattr(torchvision.datasets, cls_name, fake)
    data = load_dataset(name, tmp_path)
    assert [c[1:] for c in calls] == [(True, True), (False, True)]
    assert all(c[0].parent == tmp_path / name for c in calls)  # downloads into a temp folder
    assert data.train.images.shape == (120, 32, 32, 3) and data.test.images.shape[0] == 30
    assert data.num_classes == classes
    np.testing.assert_array_equal(data.train.images, fake(tmp_path, train=True).data)
    np.testing.assert_array_equal(data.test.labels, np.arange(30) % classes)
    # The files are written in the documented layout, the temp folder is gone ...
    files = sorted(p.name for p in (tmp_path / name).iterdir())
    assert files == ["classes.txt", "test.npz", "train.npz"]
    assert data.classes is None or data.classes[-1] == f"class{classes - 1}"
    # ... and a second load reads them without downloading, with the class names.
    monkeypatch.setattr(torchvision.datasets, cls_name, None)
    again = load_dataset(name, tmp_path)
    np.testing.assert_array_equal(again.train.images, data.train.images)
    np.testing.assert_array_equal(again.test.labels, data.test.labels)
    assert again.classes == tuple(f"class{k}" for k in range(classes))
    # A classes.txt that does not fit the labels gives no names rather than wrong ones.
    (tmp_path / name / "classes.txt").write_text("only\ntwo\n")
    assert load_dataset(name, tmp_path).classes is None


def offline(*args, **kwargs):
    raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_failed_download_says_where_to_put_the_files(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar10") in message
    assert "train.npz" in message and "test.npz" in message
    assert "--data-dir" in message and "ATTNZOO_DATA" in message
    assert "name resolution" in message  # the cause is kept
    assert list((tmp_path / "cifar10").iterdir()) == []  # no half-downloaded leftovers


def test_failed_download_names_the_file_that_is_missing(monkeypatch, tiny_cifar_root):
    (tiny_cifar_root / "cifar10" / "test.npz").unlink()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tiny_cifar_root)
    assert f"no {tiny_cifar_root / 'cifar10' / 'train.npz'}" not in str(info.value)


# ------------------------------------------------------------------ real CIFAR

# README of shared/datasets: pixel (0, 0), red channel, of images 0..9.
FIRST_RED_PIXELS = {
    ("cifar10", "train"): [59, 154, 255, 28, 170, 159, 164, 28, 134, 125],
    ("cifar10", "test"): [158, 235, 158, 155, 65, 179, 160, 83, 23, 217],
    ("cifar100", "train"): [255, 255, 250, 124, 43, 190, 50, 178, 122, 255],
    ("cifar100", "test"): [199, 113, 61, 93, 80, 168, 37, 175, 233, 182],
}


@pytest.mark.slow
@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_real_cifar(cifar_root, name, classes):
    if not (cifar_root / name / "test.npz").is_file():
        pytest.skip(f"{cifar_root} has no {name}")
    data = load_dataset(name, cifar_root)
    assert data.train.images.shape == (50_000, 32, 32, 3)
    assert data.test.images.shape == (10_000, 32, 32, 3)
    assert data.num_classes == classes
    if (cifar_root / name / "classes.txt").is_file():
        assert (
            data.classes[:2]
            == {10: ("airplane", "automobile"), 100: ("apple", "aquarium_fish")}[classes]
        )
    np.testing.assert_array_equal(np.bincount(data.train.labels), [50_000 // classes] * classes)
    np.testing.assert_array_equal(np.bincount(data.test.labels), [10_000 // classes] * classes)
    for split_name, split in (("train", data.train), ("test", data.test)):
        red = split.images[:10, 0, 0, 0].tolist()
        assert red == FIRST_RED_PIXELS[name, split_name], split_name
    # The fixed normalisation constants are the statistics of these training images.
    pixel_sums = data.train.images.reshape(50_000, -1).sum(0, dtype=np.int64)  # fast axis order
    mean = pixel_sums.reshape(-1, 3).sum(0) / (50_000 * 32 * 32 * 255)
    np.testing.assert_allclose(mean, data.mean, atol=1e-4)
