"""What the training loop needs from a dataset and from its loaders.

Two kinds of dataset implement ``Dataset``:

- ``ImageDataset`` (``datasets.py``): the whole split as uint8 arrays in memory (digits,
  CIFAR, STL-10), batched by ``InMemoryLoader`` (``loader.py``).
- ``FolderDataset`` (``folder.py``): ImageNet-style class folders of image files, decoded
  and augmented by ``torch.utils.data.DataLoader`` workers inside ``FolderLoader``.

Both loaders share the ``Loader`` interface, so ``attnzoo/train/engine.py`` does not know
which one it drives: exact resume, data-parallel sharding and channels_last work the same.

``loader.to(device)`` makes a loader hand out batches on a GPU. The in-memory loader then
holds its uint8 split on the GPU (uploaded once) and crops, flips and normalises whole
batches there; per step only the batch's indices and augmentation draws (a few KB, from the
CPU generator) go up, asynchronously from pinned memory. The folder loader decodes on the
CPU into pinned memory and copies each uint8 batch without blocking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class LoaderSettings:
    """How to batch a dataset: the training-config values that the loaders need."""

    batch_size: int
    test_batch_size: int
    seed: int = 0
    train_subset: int | None = None  # first N training images only (smoke runs)
    test_subset: int | None = None  # first N test images only
    channels_last: bool = False
    rank: int = 0  # this process's place in a data-parallel run
    world_size: int = 1
    workers: int = 0  # decoding processes (folder datasets; in-memory data needs none)
    image_size: int | None = None  # crop side (folder datasets; None: the dataset's default)


class Loader(Protocol):
    """One split, batched: iteration yields normalised float ``(x, y)`` for this process.

    ``len()`` is the number of (global) batches per epoch, ``num_samples`` the images in the
    split (all processes together). ``state_dict()`` has at least ``"position"`` (batches of
    the current epoch already handed out, 0 between epochs) and holds tensors and ints only;
    ``load_state_dict()`` makes the next ``iter()`` continue exactly there. ``generator`` is
    the seeded ``torch.Generator`` that draws the epochs' orders.
    """

    generator: torch.Generator
    rank: int
    world_size: int
    channels_last: bool

    def __len__(self) -> int: ...

    @property
    def num_samples(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SplitLoader:
    """The part both loaders share: checks, batch counting, normalisation, the generator.

    ``x_norm = (x / 255 - mean) / std`` is computed as ``x * scale + shift`` on uint8 ``x``.
    A ragged last batch is dropped in training (a batch of 1 breaks BN) and kept at test.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        seed: int,
        drop_last: bool | None,
        channels_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        self.labels = labels
        self.batch_size = batch_size
        self.train = train
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(labels) < batch_size:
            self.drop_last = False
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1)
        # The generator stays on the CPU on every device: the same seed draws the same
        # batches on a CPU and on a GPU, and a run moves between them exactly.
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> SplitLoader:
        """Hand out batches on ``device``: the labels and the normalisation move there once
        (the in-memory loader moves its images too). Returns self."""
        self.device = torch.device(device)
        self.labels = self.labels.to(self.device)
        self.scale = self.scale.to(self.device)
        self.shift = self.shift.to(self.device)
        return self

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)


class Dataset(Protocol):
    """A named dataset that knows its shape and how to make its training and test loaders."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]  # per channel, of images in [0, 1]
    std: tuple[float, float, float]

    @property
    def image_size(self) -> tuple[int, int]: ...

    def make_loaders(self, settings: LoaderSettings) -> tuple[Loader, Loader]: ...
