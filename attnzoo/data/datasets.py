"""Named datasets: where their arrays come from and how they are augmented.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  upsampled to 16x16, grey copied to RGB, fixed 80/20 stratified split (seed 0).
- ``cifar10`` / ``cifar100``: ``<root>/<name>/{train,test}.npz`` (see ``arrays.py``); if absent,
  the official release is downloaded once through torchvision and written there.

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

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[1:3])


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
    return ImageDataset(name, train, test, num_classes, mean, std, pad=4, flip=True)


# ---------------------------------------------------------------- registry
_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits_dataset,
    "cifar10": lambda data_dir=None: load_cifar_dataset("cifar10", data_dir),
    "cifar100": lambda data_dir=None: load_cifar_dataset("cifar100", data_dir),
}


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def check_dataset(name: str) -> None:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Load dataset ``name`` (see ``list_datasets()``) with its augmentation settings."""
    check_dataset(name)
    return _DATASETS[name](data_dir)


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(v) for v in x.std(0))
