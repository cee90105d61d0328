"""The on-disk split format (attnzoo/data/arrays.py): round trip, validation, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnzoo.data import DataError, Split, load_split, save_split


def random_split(n: int = 12, size: tuple[int, int] = (5, 7), seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8)
    return Split(images, np.arange(n, dtype=np.int64) % 10)


class WriteMarkerWhenUnpickled:
    """Unpickling this object calls ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip(tmp_path):
    split = random_split()
    path = tmp_path / "sub" / "train.npz"  # parent folders are created
    save_split(path, split.images, split.labels.astype(np.int32))
    loaded = load_split(path, num_classes=10)
    assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.images, split.images)
    np.testing.assert_array_equal(loaded.labels, split.labels)
    # The file is a plain npz with exactly the two documented arrays.
    with np.load(path, allow_pickle=False) as d:
        assert sorted(d.files) == ["images", "labels"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "cifar10" / "train.npz"
    with pytest.raises(DataError, match="missing") as info:
        load_split(path)
    assert str(path) in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "train.npz"
    split = random_split()
    save_split(path, split.images, split.labels)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        load_split(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not an npz at all\n", bytes(range(256)) * 8])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "train.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="train.npz"):
        load_split(path)


def test_npy_file_with_npz_name_is_a_data_error(tmp_path):
    path = tmp_path / "train.npz"
    with open(path, "wb") as f:
        np.save(f, random_split().images)
    with pytest.raises(DataError, match="train.npz"):
        load_split(path)


@pytest.mark.parametrize("missing", ["labels", "images"])
def test_file_lacking_an_array(tmp_path, missing):
    split = random_split()
    arrays = {"images": split.images, "labels": split.labels}
    del arrays[missing]
    path = tmp_path / "train.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=f"lacks array\\(s\\) {missing}") as info:
        load_split(path)
    assert str(path) in str(info.value)


N = 6
GOOD_IMAGES = np.zeros((N, 4, 4, 3), np.uint8)
GOOD_LABELS = np.arange(N, dtype=np.int64)


@pytest.mark.parametrize(
    "images,labels,message",
    [
        (GOOD_IMAGES.astype(np.float32) / 255, GOOD_LABELS, "'images' must be uint8"),
        (GOOD_IMAGES.astype(np.int64), GOOD_LABELS, "'images' must be uint8"),
        (GOOD_IMAGES[..., :1], GOOD_LABELS, "'images' must be uint8 \\[N, H, W, 3\\]"),
        (GOOD_IMAGES[..., 0], GOOD_LABELS, "'images' must be uint8 \\[N, H, W, 3\\]"),
        (GOOD_IMAGES.transpose(0, 3, 1, 2), GOOD_LABELS, "'images' must be uint8"),  # NCHW
        (GOOD_IMAGES, GOOD_LABELS[:-1], "N = 6 images"),
        (GOOD_IMAGES, GOOD_LABELS[:, None], "'labels' must be \\[N\\]"),
        (GOOD_IMAGES, GOOD_LABELS.astype(np.float64), "'labels' must be integers"),
        (GOOD_IMAGES, GOOD_LABELS % 2 == 0, "'labels' must be integers"),
        (GOOD_IMAGES[:0], GOOD_LABELS[:0], "empty"),
    ],
    ids=[
        "float-images",
        "int64-images",
        "one-channel",
        "no-channel-axis",
        "nchw",
        "n-mismatch",
        "2d-labels",
        "float-labels",
        "bool-labels",
        "empty",
    ],
)
def test_bad_arrays_are_refused(tmp_path, images, labels, message):
    path = tmp_path / "train.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(DataError, match=message) as info:
        load_split(path, num_classes=10)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "labels,num_classes",
    [([0, 1, 2, -1, 4, 5], None), ([0, 1, 2, -1, 4, 5], 10), ([0, 1, 2, 10, 4, 5], 10)],
)
def test_labels_out_of_range(tmp_path, labels, num_classes):
    path = tmp_path / "train.npz"
    np.savez(path, images=GOOD_IMAGES, labels=np.array(labels))
    with pytest.raises(DataError, match="labels must lie in"):
        load_split(path, num_classes=num_classes)


def test_labels_are_checked_against_num_classes_only_when_given(tmp_path):
    path = tmp_path / "train.npz"
    save_split(path, GOOD_IMAGES, GOOD_LABELS + 100)
    assert load_split(path).labels.max() == 105
    with pytest.raises(DataError, match=r"\[0, 10\)"):
        load_split(path, num_classes=10)


def test_save_split_validates(tmp_path):
    with pytest.raises(DataError, match="'images' must be uint8 \\[N, H, W, 3\\]"):
        save_split(tmp_path / "x.npz", GOOD_IMAGES[..., 0], GOOD_LABELS)
    with pytest.raises(DataError, match="N = 6 images"):
        save_split(tmp_path / "x.npz", GOOD_IMAGES, GOOD_LABELS[:3])
    with pytest.raises(DataError, match="labels must lie in"):
        save_split(tmp_path / "x.npz", GOOD_IMAGES, GOOD_LABELS - 1)
    assert list(tmp_path.iterdir()) == []


def test_save_split_refuses_float_images(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(DataError, match="uint8"):
        save_split(path, np.full((N, 4, 4, 3), 0.5), GOOD_LABELS)


def test_pickled_object_array_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "unpickled-marker"
    path = tmp_path / "train.npz"
    evil = np.empty(N, dtype=object)
    evil[:] = [WriteMarkerWhenUnpickled(marker) for _ in range(N)]
    np.savez(path, images=GOOD_IMAGES, labels=evil)  # np.savez pickles object arrays
    with pytest.raises((DataError, ValueError), match="(?i)pickle|object"):
        load_split(path, num_classes=10)
    assert not marker.exists()


def test_whole_pickle_file_is_refused_without_running_it(tmp_path):
    import pickle

    marker = tmp_path / "unpickled-marker"
    path = tmp_path / "train.npz"
    path.write_bytes(pickle.dumps({"images": WriteMarkerWhenUnpickled(marker)}))
    with pytest.raises((DataError, ValueError)):
        load_split(path)
    assert not marker.exists()


def test_save_split_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "train.npz"
    old = random_split(seed=1)
    save_split(path, old.images, old.labels)
    before = path.read_bytes()

    def failing_savez(file, **arrays):
        file.write(b"PK\x03\x04 half of a zip")  # something reaches the temp file
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    new = random_split(seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_split(path, new.images, new.labels)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]  # no temp files left
    monkeypatch.undo()
    np.testing.assert_array_equal(load_split(path).images, old.images)


def test_save_split_into_a_new_folder_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def failing_savez(file, **arrays):
        raise KeyboardInterrupt  # BaseException: the temp file must still go

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(KeyboardInterrupt):
        save_split(tmp_path / "cifar10" / "train.npz", GOOD_IMAGES, GOOD_LABELS)
    assert list((tmp_path / "cifar10").iterdir()) == []
