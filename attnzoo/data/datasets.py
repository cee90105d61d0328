"""Named datasets: where their images come from and how they are augmented.

In memory (``ImageDataset``: uint8 arrays, batched by ``loader.InMemoryLoader``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  upsampled to 16x16, grey copied to RGB, fixed 80/20 stratified split (seed 0).
- ``cifar10`` / ``cifar100``: ``<root>/<name>/{train,test}.npz`` (see ``arrays.py``); if absent,
  the official release is downloaded once through torchvision and written there.
- ``stl10``: the 13,000 labelled STL-10 images (5,000 train + 8,000 test, 96x96), pooled and
  split 7:3 as in the HAM paper (``stratified_split``: 9,100 / 3,900, 910 / 390 per class,
  seed 0), cached as ``<root>/stl10/{train,test}.npz``. Without them, they are made from the
  official binary files in ``<root>/stl10/stl10_binary/``, else from a torchvision download.
  Mean/std are those of the 9,100 training images. Crops with 12-px padding, flips.

From files (``folder.FolderDataset``: decoded by DataLoader workers, ``folder.FolderLoader``):

- ``imagenet``: ImageNet-style ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` in
  ``<root>/imagenet`` (or in ``<root>`` itself if it holds ``train/`` and ``val/``); random
  resized 224 crops and flips, val resize 256 and centre crop 224 (``folder.py``).

The data root is ``--data-dir``, else ``$ATTNZOO_DATA``, else ``$XDG_CACHE_HOME/attnzoo``
(``~/.cache/attnzoo``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import DataError, Split, load_split, save_split
from .base import Dataset, LoaderSettings
from .folder import load_folder_dataset
from .loader import InMemoryLoader


@dataclass
class ImageDataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, float, float]  # of the training images, in [0, 1]
    std: tuple[float, float, float]
    pad: int  # random-crop zero padding in pixels (0: no crop)
    flip: bool  # random horizontal flip
    classes: tuple[str, ...] | None = None  # class names by label, where the files give them

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[1:3])

    def make_loaders(self, settings: LoaderSettings) -> tuple[InMemoryLoader, InMemoryLoader]:
        """Training and test loaders (``base.Dataset``); a subset is the first N images."""
        if settings.image_size is not None and settings.image_size != self.image_size[0]:
            raise ValueError(
                f"{self.name} images are {self.image_size[0]}x{self.image_size[1]}; "
                f"image_size only resizes folder datasets (imagenet): drop --image-size"
            )
        train, test = self.train, self.test
        common = dict(
            mean=self.mean,
            std=self.std,
            channels_last=settings.channels_last,
            rank=settings.rank,
            world_size=settings.world_size,
        )
        # A subset is the first N images ([:None] is the whole split).
        n, m = settings.train_subset, settings.test_subset
        train_loader = InMemoryLoader(
            train.images[:n],
            train.labels[:n],
            settings.batch_size,
            train=True,
            pad=self.pad,
            flip=self.flip,
            seed=settings.seed,
            **common,
        )
        test_loader = InMemoryLoader(
            test.images[:m], test.labels[:m], settings.test_batch_size, **common
        )
        return train_loader, test_loader


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("ATTNZOO_DATA"):
        return Path(os.environ["ATTNZOO_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "attnzoo"


# ---------------------------------------------------------------- digits
def load_digits_dataset(data_dir=None) -> ImageDataset:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    grey = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0))  # [N, 8, 8]
    big = F.interpolate(grey[:, None], size=(16, 16), mode="bilinear", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8)[:, 0, :, :, None].expand(-1, -1, -1, 3)
    images = np.ascontiguousarray(images.numpy())
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    train = Split(images[idx_train], labels[idx_train])
    test = Split(images[idx_test], labels[idx_test])
    mean, std = _stats(train.images)
    return ImageDataset("digits", train, test, 10, mean, std, pad=2, flip=False)


# ---------------------------------------------------------------- CIFAR
CIFAR = {  # name -> (classes, torchvision class name)
    "cifar10": (10, "CIFAR10"),
    "cifar100": (100, "CIFAR100"),
}
# Standard per-channel statistics of the CIFAR training sets (used so that results do not
# depend on which subset happens to be loaded).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def download_cifar(name: str, root: Path) -> None:
    """Fetch the official release through torchvision and write train/test.npz atomically."""
    import torchvision

    num_classes, cls_name = CIFAR[name]
    target = root / name
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as tmp:
        for split, train in (("train", True), ("test", False)):
            try:
                ds = getattr(torchvision.datasets, cls_name)(tmp, train=train, download=True)
            except Exception as e:  # network failure, checksum failure, ...
                raise DataError(
                    f"{name}: {target / 'train.npz'} and {target / 'test.npz'} are not both "
                    f"there, and the download failed ({e}). "
                    f"Put train.npz/test.npz there (arrays 'images' uint8 [N,32,32,3], "
                    f"'labels' int64 [N]) or point --data-dir / ATTNZOO_DATA at a root that "
                    f"has them"
                ) from e
            save_split(target / f"{split}.npz", np.asarray(ds.data), np.asarray(ds.targets))
        _write_text(target / "classes.txt", "".join(f"{c}\n" for c in ds.classes))


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_class_names(path: Path, num_classes: int) -> tuple[str, ...] | None:
    """``classes.txt`` beside a dataset's files (line i names label i), if it is usable.

    The names only label pictures, so a missing or unfit file means no names, not an error."""
    try:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        return None
    return names if len(names) == num_classes else None


def load_cifar_dataset(name: str, data_dir=None) -> ImageDataset:
    num_classes, _ = CIFAR[name]
    root = data_root(data_dir)
    folder = root / name
    files = [folder / "train.npz", folder / "test.npz"]
    if not all(f.exists() for f in files):
        download_cifar(name, root)
    train = load_split(files[0], num_classes)
    test = load_split(files[1], num_classes)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{folder}: train images are {train.images.shape[1:]} but test images are "
            f"{test.images.shape[1:]}"
        )
    mean, std = CIFAR_STATS[name]
    classes = read_class_names(folder / "classes.txt", num_classes)
    return ImageDataset(name, train, test, num_classes, mean, std, 4, True, classes)


# ---------------------------------------------------------------- STL-10
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
STL10_TEST_PERCENT = 30  # HAM paper Sec. 4.3: the 13,000 labelled images split 7:3
STL10_SPLIT_SEED = 0
_STL10_SIDE = 96


def read_stl10_binary(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The labelled images of the official binary release, train files then test files.

    Each image in ``*_X.bin`` is 3 planes (R, G, B) of 96x96 bytes in column-major order;
    ``*_y.bin`` holds one byte per image, the class 1..10. Returns uint8 [N, 96, 96, 3] and
    int64 labels 0..9. Read here rather than through ``torchvision.datasets.STL10``, which
    needs the 2.7 GB ``unlabeled_X.bin`` as well and checksums every file on each load.
    """
    images, labels = [], []
    per_image = 3 * _STL10_SIDE * _STL10_SIDE
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        for path in (x_path, y_path):
            if not path.is_file():
                raise DataError(
                    f"stl10: missing {path}; copy all of {', '.join(STL10_FILES)} from the "
                    f"official stl10_binary.tar.gz into {folder}"
                )
        raw = np.fromfile(x_path, dtype=np.uint8)
        y = np.fromfile(y_path, dtype=np.uint8)
        if y.size == 0 or raw.size != y.size * per_image:
            raise DataError(
                f"stl10: {x_path} has {raw.size} bytes, not the {y.size} images of 3x96x96 "
                f"that {y_path.name} labels; the files are truncated or not STL-10's: copy "
                f"them again"
            )
        if y.min() < 1 or y.max() > 10:
            raise DataError(
                f"stl10: {y_path} holds labels {y.min()}..{y.max()}, not 1..10; copy it again"
            )
        side = _STL10_SIDE
        images.append(raw.reshape(-1, 3, side, side).transpose(0, 3, 2, 1))  # -> [N, H, W, C]
        labels.append(y.astype(np.int64) - 1)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def stratified_split(
    labels: np.ndarray, test_percent: int = STL10_TEST_PERCENT, seed: int = STL10_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a fixed stratified split.

    With ``rng = np.random.default_rng(seed)``: for each class in increasing order, its
    indices are permuted by ``rng`` and the first ``round(n_c * test_percent / 100)`` (half
    up) go to test; the rest is train. Each part is then put in an ``rng``-permuted order,
    so that its first N images (``--test-subset``) are a random sample of every class.
    """
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: (len(members) * test_percent + 50) // 100])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return rng.permutation(train), rng.permutation(test)


def prepare_stl10(root: Path) -> None:
    """Write ``<root>/stl10/{train,test}.npz``: the pooled labelled images, split 7:3.

    From ``<root>/stl10/stl10_binary/`` if it exists, else from the official release
    downloaded once through torchvision into a temporary folder (removed afterwards).
    """
    target = root / "stl10"
    binary = target / "stl10_binary"
    if binary.is_dir():
        images, labels = read_stl10_binary(binary)
    else:
        import torchvision

        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as tmp:
            try:
                torchvision.datasets.STL10(tmp, split="test", download=True)
            except Exception as e:  # network failure, checksum failure, ...
                reason = " ".join(str(e).split()) or type(e).__name__
                raise DataError(
                    f"stl10: {target / 'train.npz'} and {target / 'test.npz'} are not both "
                    f"there, nor is {binary}, and the download failed ({reason}). Put the "
                    f"official stl10_binary folder (from stl10_binary.tar.gz; "
                    f"{', '.join(STL10_FILES)} are enough) at {binary}, or train.npz/test.npz "
                    f"(arrays 'images' uint8 [N,96,96,3], 'labels' int64 [N]) in {target}, or "
                    f"point --data-dir / ATTNZOO_DATA at a root that has them"
                ) from e
            images, labels = read_stl10_binary(Path(tmp) / "stl10_binary")
    train, test = stratified_split(labels)
    save_split(target / "test.npz", images[test], labels[test])
    save_split(target / "train.npz", images[train], labels[train])


def load_stl10_dataset(data_dir=None) -> ImageDataset:
    root = data_root(data_dir)
    folder = root / "stl10"
    files = [folder / "train.npz", folder / "test.npz"]
    if not all(f.exists() for f in files):
        prepare_stl10(root)
    train = load_split(files[0], 10)
    test = load_split(files[1], 10)
    for path, split in zip(files, (train, test), strict=True):
        if split.images.shape[1:] != (_STL10_SIDE, _STL10_SIDE, 3):
            raise DataError(
                f"{path}: STL-10 images are 96x96x3, got {split.images.shape[1:]}; delete "
                f"train.npz/test.npz there to make them again"
            )
    mean, std = _stats(train.images)
    return ImageDataset("stl10", train, test, 10, mean, std, pad=12, flip=True)


# ---------------------------------------------------------------- registry
_DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_dataset,
    "cifar10": lambda data_dir=None: load_cifar_dataset("cifar10", data_dir),
    "cifar100": lambda data_dir=None: load_cifar_dataset("cifar100", data_dir),
    "stl10": load_stl10_dataset,
    "imagenet": lambda data_dir=None: load_folder_dataset("imagenet", data_root(data_dir)),
}


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def check_dataset(name: str) -> None:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name`` (see ``list_datasets()``) with its augmentation settings: an
    ``ImageDataset`` (arrays in memory) or a ``FolderDataset`` (files, ``imagenet``)."""
    check_dataset(name)
    return _DATASETS[name](data_dir)


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 RGB images in [0, 1], from value histograms (exact,
    and without a float copy of the images: STL-10's would take 2 GB)."""
    counts = np.stack(
        [np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]
    ).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(1)
    mean = counts @ values / total
    std = np.sqrt(np.maximum((counts @ values**2) / total - mean**2, 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
