"""The on-disk format of an image dataset split, and its validation.

A split is one ``.npz`` file (no pickles) with:
    images  uint8 [N, H, W, 3]  RGB, channels last
    labels  int64 [N]
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils.io import atomic_write


class DataError(Exception):
    """A dataset is missing, unreadable or inconsistent; the message says what to do."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]


def save_split(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> None:
    """Write a split atomically in the documented layout."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        if (
            not np.issubdtype(images.dtype, np.integer)
            or images.size == 0
            or (images.min() < 0 or images.max() > 255)
        ):
            raise DataError(
                f"{path}: 'images' must be uint8 (or integers in [0, 255]), got {images.dtype}"
            )
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    _check(images, labels, path, num_classes=None)
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))


def load_split(path: str | os.PathLike, num_classes: int | None = None) -> Split:
    """Load and validate a split; every failure is a ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing dataset file {path}")
    try:
        d = np.load(path, allow_pickle=False)
        if not isinstance(d, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path} is a single .npy array, not an .npz archive with 'images' and 'labels'"
            )
        with d:
            missing = [k for k in ("images", "labels") if k not in d.files]
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {', '.join(missing)}; expected 'images' "
                    f"(uint8 [N, H, W, 3]) and 'labels' (int64 [N])"
                )
            images, labels = d["images"], d["labels"]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, TypeError, KeyError) as e:
        raise DataError(f"cannot read {path} ({e}); the file is truncated or not an .npz") from e
    _check(images, labels, path, num_classes)
    return Split(images, labels.astype(np.int64, copy=False))


def _check(images: np.ndarray, labels: np.ndarray, path, num_classes: int | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{path}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: 'labels' must be [N] with N = {images.shape[0]} images, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if images.shape[0] == 0:
        raise DataError(f"{path}: the split is empty")
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]"
        )
