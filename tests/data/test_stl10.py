"""STL-10 (attnzoo/data/datasets.py): the official binary files, the pooled 7:3 split, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torchvision

from attnzoo.data import DataError, ImageDataset, load_dataset, load_split
from attnzoo.data.datasets import read_stl10_binary, stratified_split


def write_stl10_binary(folder: Path, n_train: int = 40, n_test: int = 60) -> np.ndarray:
    """A fake ``stl10_binary`` folder in the official format; returns the pooled images
    (train then test, uint8 [N, 96, 96, 3]) as they must come back.

    Per the STL-10 page: each image is 3 planes (R, G, B) of 96x96 bytes, column-major (the
    column index varies slowest within a plane); labels are one byte each, 1..10. Every
    image carries its pooled index in pixel (0, 0) so that it can be found after the split,
    and a bright top-left-only corner so that a transposition or flip would show.
    """
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pooled = rng.integers(0, 200, size=(n_train + n_test, 96, 96, 3), dtype=np.uint8)
    pooled[:, :8, :20] = 255  # 8 rows x 20 columns: not square, so a transpose shows
    index = np.arange(n_train + n_test)
    pooled[:, 0, 0, 0], pooled[:, 0, 0, 1] = index // 256, index % 256
    for split, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        images = pooled[part]
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
        labels = (np.arange(len(images)) % 10 + 1).astype(np.uint8)
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
    return pooled


def pooled_labels(n_train: int = 40, n_test: int = 60) -> np.ndarray:
    return np.concatenate([np.arange(n_train) % 10, np.arange(n_test) % 10])


def ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 0, 1]


@pytest.fixture
def binary_root(tmp_path: Path) -> tuple[Path, np.ndarray]:
    return tmp_path, write_stl10_binary(tmp_path / "stl10" / "stl10_binary")


def test_reader_matches_the_official_layout_and_torchvision(binary_root, monkeypatch):
    root, pooled = binary_root
    folder = root / "stl10" / "stl10_binary"
    images, labels = read_stl10_binary(folder)
    np.testing.assert_array_equal(images, pooled)
    np.testing.assert_array_equal(labels, pooled_labels())
    assert images[:, 1:8, 1:20].min() == 255 and images[:, 8:, 20:].max() < 255  # upright
    # torchvision's reader (its checksums switched off: these are not the real files) agrees.
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    for split, part in (("train", slice(0, 40)), ("test", slice(40, None))):
        theirs = torchvision.datasets.STL10(root / "stl10", split=split)
        np.testing.assert_array_equal(theirs.data.transpose(0, 2, 3, 1), pooled[part])
        np.testing.assert_array_equal(theirs.labels, pooled_labels()[part])


def test_pooled_split_is_stratified_7_to_3(binary_root):
    root, pooled = binary_root
    data = load_dataset("stl10", root)
    assert isinstance(data, ImageDataset)
    assert (data.num_classes, data.image_size, data.pad, data.flip) == (10, (96, 96), 12, True)
    assert len(data.train.labels) == 70 and len(data.test.labels) == 30
    np.testing.assert_array_equal(np.bincount(data.train.labels), [7] * 10)
    np.testing.assert_array_equal(np.bincount(data.test.labels), [3] * 10)
    train_ids, test_ids = ids(data.train.images), ids(data.test.images)
    assert not set(train_ids) & set(test_ids)
    assert sorted([*train_ids, *test_ids]) == list(range(100))
    # Every image comes back whole, upright and with its own label.
    np.testing.assert_array_equal(data.train.images, pooled[train_ids])
    np.testing.assert_array_equal(data.test.labels, pooled_labels()[test_ids])
    # Both originals contribute to both parts (the pool is really pooled) ...
    assert (train_ids < 40).any() and (train_ids >= 40).any() and (test_ids < 40).any()
    # ... and the parts are stored shuffled, so a --test-subset is a random sample.
    assert not np.array_equal(test_ids, np.sort(test_ids))


def test_split_is_deterministic(tmp_path):
    for name in ("a", "b"):
        write_stl10_binary(tmp_path / name / "stl10" / "stl10_binary")
    a, b = load_dataset("stl10", tmp_path / "a"), load_dataset("stl10", tmp_path / "b")
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert (a.mean, a.std) == (b.mean, b.std)


def test_split_of_the_real_sizes():
    # STL-10: 500 train and 800 test images per class.
    labels = np.concatenate([np.repeat(np.arange(10), 500), np.repeat(np.arange(10), 800)])
    train, test = stratified_split(labels)
    assert (len(train), len(test)) == (9100, 3900)
    np.testing.assert_array_equal(np.bincount(labels[train]), [910] * 10)
    np.testing.assert_array_equal(np.bincount(labels[test]), [390] * 10)
    assert len(np.union1d(train, test)) == 13_000
    again = stratified_split(labels)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, seed=1)[1], test)


def test_npz_cache_is_written_and_used(binary_root):
    root, _ = binary_root
    data = load_dataset("stl10", root)
    folder = root / "stl10"
    assert {p.name for p in folder.iterdir()} == {"stl10_binary", "train.npz", "test.npz"}
    for p in (folder / "stl10_binary").iterdir():
        p.unlink()  # the cache alone is enough from now on
    (folder / "stl10_binary").rmdir()
    again = load_dataset("stl10", root)
    np.testing.assert_array_equal(again.train.images, data.train.images)
    np.testing.assert_array_equal(again.test.labels, data.test.labels)
    cached = load_split(folder / "train.npz", 10)
    np.testing.assert_array_equal(cached.images, data.train.images)


def test_mean_and_std_are_those_of_the_training_split(binary_root):
    root, _ = binary_root
    data = load_dataset("stl10", root)
    x = data.train.images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(data.std, x.std(0), rtol=1e-10)


def test_download_pools_and_removes_the_temp_folder(tmp_path, monkeypatch):
    calls = []

    class FakeSTL10:
        def __init__(self, root, split="train", download=False):
            calls.append((Path(root), split, download))
            write_stl10_binary(Path(root) / "stl10_binary")

    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10)
    data = load_dataset("stl10", tmp_path)
    assert len(calls) == 1 and calls[0][2] is True
    assert calls[0][0].parent == tmp_path / "stl10"  # a temp folder there, then removed
    assert sorted(p.name for p in (tmp_path / "stl10").iterdir()) == ["test.npz", "train.npz"]
    assert len(data.train.labels) == 70


def offline(*args, **kwargs):
    raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_failed_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    with pytest.raises(DataError) as info:
        load_dataset("stl10", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "stl10" / "stl10_binary") in message
    assert "train_X.bin" in message and "train.npz" in message
    assert "--data-dir" in message and "name resolution" in message
    assert "\n" not in message
    assert list((tmp_path / "stl10").iterdir()) == []  # no half-downloaded leftovers


def test_truncated_binary_file(binary_root):
    root, _ = binary_root
    path = root / "stl10" / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="test_X.bin.*copy them again"):
        load_dataset("stl10", root)


def test_missing_binary_file(binary_root):
    root, _ = binary_root
    (root / "stl10" / "stl10_binary" / "train_y.bin").unlink()
    with pytest.raises(DataError, match="missing .*train_y.bin"):
        load_dataset("stl10", root)


def test_bad_labels(binary_root):
    root, _ = binary_root
    (root / "stl10" / "stl10_binary" / "train_y.bin").write_bytes(bytes(40))  # all 0
    with pytest.raises(DataError, match="not 1..10"):
        load_dataset("stl10", root)
