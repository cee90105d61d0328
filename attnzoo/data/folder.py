"""ImageNet-style folder datasets: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``.

Where: the dataset folder is ``<root>`` itself if it holds both ``train/`` and ``val/``
(``--data-dir`` pointing straight at the dataset), otherwise ``<root>/<name>``
(``<root>/imagenet``). Files are found by ``torchvision.datasets.ImageFolder`` (its image
extensions: .jpg, .jpeg, .png, .bmp, .webp, ...); classes are the sorted folder names and
train and val must have the same ones. Images are decoded lazily, so a corrupt file is
reported (a ``DataError`` naming it) when its batch is first loaded.

Augmentation (the standard ImageNet recipe of the ResNet papers, as torchvision's
references): training images get a random resized crop (scale 0.08-1, aspect ratio 3/4-4/3,
bilinear, to ``image_size``, default 224) and a horizontal flip with probability 1/2;
evaluation images are resized so that the shorter side is ``image_size * 256 / 224`` (256)
and centre-cropped. Both are normalised with the ImageNet mean/std.

``FolderLoader`` has the interface of ``InMemoryLoader`` (``base.Loader``), with the same
reproducibility guarantees:

- A seeded ``torch.Generator`` draws each epoch's order and one epoch seed; the crop and flip
  of sample ``i`` come from a generator seeded with (epoch seed, i). So the batches and their
  augmentation depend on the seed only, not on the number of workers or processes.
- Data-parallel sharding: every process draws the same order; each global batch of
  ``batch_size`` is cut into contiguous slices, one per rank, as in ``InMemoryLoader``.
- Exact mid-epoch resume: ``state_dict()`` is the generator state the current epoch was
  drawn from plus the number of batches already handed out; ``load_state_dict()`` makes the
  next ``iter()`` redraw the same order and skip those batches (they are never decoded).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from .arrays import DataError
from .base import LoaderSettings, SplitLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
SUBSET_SEED = 0  # the fixed shuffle that --train-subset / --test-subset take the first N of
_MAX_SEED = 2**64


def default_workers() -> int:
    """Decoding processes when none are configured: min(4, CPU cores)."""
    return min(4, os.cpu_count() or 1)


def _sample_seed(epoch_seed: int, index: int) -> int:
    # A multiplicative hash keeps neighbouring samples' seeds far apart.
    return (epoch_seed + (index + 1) * 0x9E3779B97F4A7C15) % _MAX_SEED


class FolderImages(torch.utils.data.Dataset):
    """Decodes and augments one image per request ``(index, epoch_seed)``: a uint8 [3, S, S]
    tensor, or on a bad file a message string (turned into a ``DataError`` by the loader, so
    that a failure in a worker process still reads as one line)."""

    def __init__(self, paths: list[str], train: bool, image_size: int) -> None:
        self.paths = paths
        self.train = train
        self.image_size = image_size
        self.resize = round(image_size * 256 / 224)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, request: tuple[int, int]) -> torch.Tensor | str:
        from PIL import Image
        from torchvision import transforms
        from torchvision.transforms import functional as TF

        index, epoch_seed = request
        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = " ".join(str(e).split()) or type(e).__name__
            return f"cannot read image {path} ({reason}); replace or delete the file"
        s = self.image_size
        if self.train:
            # Seed the global generator for torchvision's own crop sampler, in a fork so that
            # the caller's random state (the main process, with 0 workers) is left untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(epoch_seed, index))
                top, left, h, w = transforms.RandomResizedCrop.get_params(
                    image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
                )
                flip = bool(torch.rand(()) < 0.5)
            image = TF.resized_crop(
                image, top, left, h, w, [s, s], transforms.InterpolationMode.BILINEAR
            )
            if flip:
                image = TF.hflip(image)
        else:
            image = TF.center_crop(TF.resize(image, self.resize), [s, s])
        return TF.pil_to_tensor(image)


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | str:
    for item in items:
        if isinstance(item, str):
            return item
    return torch.stack(items)


class FolderLoader(SplitLoader):
    """Batches of image files through a ``DataLoader`` with ``workers`` processes (see the
    module docstring); the interface and guarantees of ``InMemoryLoader``."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        batch_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        train: bool = False,
        image_size: int = DEFAULT_IMAGE_SIZE,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if not samples:
            raise DataError("a folder split without images")
        super().__init__(
            torch.tensor([c for _, c in samples], dtype=torch.int64),
            batch_size,
            mean,
            std,
            train,
            seed % _MAX_SEED,
            drop_last,
            channels_last,
            rank,
            world_size,
        )
        self.images = FolderImages([p for p, _ in samples], train, image_size)
        self.image_size = image_size
        self.workers = workers
        # The generator state the current epoch was drawn from (None between epochs), the
        # batches handed out in it, and a loaded state that the next iter() continues.
        self._epoch_start: torch.Tensor | None = None
        self._position = 0
        self._resume_at: tuple[torch.Tensor, int] | None = None

    def _shard(self, m: int) -> slice:
        return slice(self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size)

    def _draw_epoch(self) -> tuple[torch.Tensor, int]:
        n = len(self.labels)
        if not self.train:
            return torch.arange(n), 0
        order = torch.randperm(n, generator=self.generator)
        epoch_seed = int(torch.randint(0, 2**63 - 1, (), generator=self.generator))
        return order, epoch_seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches; after ``load_state_dict`` of a mid-epoch state, its rest."""
        if self._resume_at is not None:
            (start, position), self._resume_at = self._resume_at, None
            self.generator.set_state(start)
        else:
            start, position = self.generator.get_state(), 0
        order, epoch_seed = self._draw_epoch()
        self._epoch_start, self._position = start, position
        b = self.batch_size
        shards = []
        for i in range(position, len(self)):
            idx = order[i * b : (i + 1) * b]
            shards.append(idx[self._shard(len(idx))])
        requests = [[(int(k), epoch_seed) for k in idx] for idx in shards if len(idx)]
        batches = iter(
            torch.utils.data.DataLoader(
                self.images,
                batch_sampler=requests,
                num_workers=self.workers,
                collate_fn=_collate,
                # Its own generator: the workers' base seed is otherwise drawn from the global
                # one (our augmentation does not use the workers' seeds).
                generator=torch.Generator().manual_seed(0),
                # For a GPU: page-locked batches, so that each copy below does not block.
                pin_memory=self.device.type == "cuda",
            )
        )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        s = self.image_size
        for i, idx in enumerate(shards, start=position):
            if len(idx):
                x = next(batches)
                if isinstance(x, str):
                    raise DataError(x)
            else:  # this process's share of a short last batch
                x = torch.empty((0, 3, s, s), dtype=torch.uint8)
            x = x.to(self.device, non_blocking=True)  # uint8: a quarter of the float bytes
            x = torch.addcmul(self.shift, x.float(), self.scale).contiguous(
                memory_format=memory_format
            )
            self._position = i + 1
            if self._position == len(self):
                self._epoch_start, self._position = None, 0
            yield x, self.labels[idx]

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Generator state and position in the epoch; tensors and ints only (weights-only safe)."""
        if self._resume_at is not None:
            generator, position = self._resume_at
        elif self._epoch_start is not None and self._position > 0:
            generator, position = self._epoch_start, self._position
        else:
            generator, position = self.generator.get_state(), 0
        return {"generator": generator.clone(), "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; a state that cannot belong to this loader is refused."""
        generator, position = state["generator"], state["position"]
        if not isinstance(position, int) or isinstance(position, bool):
            raise ValueError(f"loader position must be an int, got {position!r}")
        if not 0 <= position < len(self):
            raise ValueError(f"loader position {position} is outside 0..{len(self) - 1}")
        self.generator.set_state(generator)  # raises on a state of the wrong type or size
        self._epoch_start, self._position = None, 0
        self._resume_at = None if position == 0 else (generator.clone(), position)


# ---------------------------------------------------------------- dataset
@dataclass
class FolderDataset:
    """Train and val file lists of a folder dataset (``base.Dataset``)."""

    name: str
    folder: Path
    classes: list[str]
    train_samples: list[tuple[str, int]]
    test_samples: list[tuple[str, int]]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: int = DEFAULT_IMAGE_SIZE

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop)

    def make_loaders(self, settings: LoaderSettings) -> tuple[FolderLoader, FolderLoader]:
        """Training and val loaders. A subset is the first N of a fixed (seed 0) shuffle of
        the files, so that it has every class (the files are sorted by class)."""
        size = settings.image_size or self.crop
        common = dict(
            mean=self.mean,
            std=self.std,
            image_size=size,
            channels_last=settings.channels_last,
            rank=settings.rank,
            world_size=settings.world_size,
            workers=settings.workers,
        )
        train = FolderLoader(
            _subset(self.train_samples, settings.train_subset),
            settings.batch_size,
            train=True,
            seed=settings.seed,
            **common,
        )
        test = FolderLoader(
            _subset(self.test_samples, settings.test_subset), settings.test_batch_size, **common
        )
        return train, test


def _subset(samples: list[tuple[str, int]], count: int | None) -> list[tuple[str, int]]:
    if not count or count >= len(samples):
        return samples
    g = torch.Generator().manual_seed(SUBSET_SEED)
    keep = torch.randperm(len(samples), generator=g)[:count]
    return [samples[int(i)] for i in keep]


def find_folder(root: Path, name: str) -> Path:
    """``root`` if it holds ``train/`` and ``val/``, else ``root/name`` (see the docstring)."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    folder = root / name
    missing = [folder / s for s in ("train", "val") if not (folder / s).is_dir()]
    if missing:
        raise DataError(
            f"{name}: no folder {' or '.join(str(m) for m in missing)}; put the dataset there "
            f"as train/<class>/<image> and val/<class>/<image> (the val images sorted into "
            f"class folders too), or point --data-dir / ATTNZOO_DATA at a folder that holds "
            f"train/ and val/"
        )
    return folder


def _scan(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    try:
        found = ImageFolder(str(split_dir))
    except FileNotFoundError as e:  # no class folder, or a class folder without images
        reason = " ".join(str(e).split())
        raise DataError(
            f"{split_dir}: {reason}; every class needs a folder with at least one image"
        ) from e
    return list(found.classes), [(str(p), int(c)) for p, c in found.samples]


def load_folder_dataset(name: str, root: Path) -> FolderDataset:
    """Scan ``train/`` and ``val/`` of the folder dataset ``name`` under ``root``."""
    folder = find_folder(root, name)
    train_classes, train = _scan(folder / "train")
    val_classes, val = _scan(folder / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = [
            f"only in {s}: {', '.join(c[:5])}{', ...' if len(c) > 5 else ''}"
            for s, c in (("train", only_train), ("val", only_val))
            if c
        ]
        raise DataError(
            f"{folder}: train and val have different classes ({'; '.join(parts)}); give both "
            f"the same class folders"
        )
    return FolderDataset(name, folder, train_classes, train, val)
