"""Batched in-memory loader (after the design of KellerJordan/cifar10-airbench).

The whole split is one uint8 tensor in memory. Each batch is cut out with one gather that
does the random crop (zero padding ``pad`` pixels on each side) and the horizontal flip
together, then converted to float and normalised with one fused multiply-add. Shuffling
and augmentation draw from one seeded ``torch.Generator``, whose state is saved with
checkpoints so that a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


class InMemoryLoader:
    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        pad: int = 0,
        flip: bool = False,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.batch_size = batch_size
        self.train = train
        self.pad = pad if train else 0
        self.flip = flip and train
        # Drop a ragged last batch in training (a batch of 1 breaks BN), keep it at test.
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(self.labels) < batch_size:
            self.drop_last = False
        self.channels_last = channels_last
        std_t = torch.tensor(std, dtype=torch.float32)
        # x_norm = (x/255 - mean)/std = x * scale + shift
        self.scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def _augment(self, batch: torch.Tensor) -> torch.Tensor:
        n, _, h, w = batch.shape
        p = self.pad
        if p == 0 and not self.flip:
            return batch
        if p:
            batch = F.pad(batch, (p, p, p, p))
        g = self.generator
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        cols = torch.arange(w).expand(n, w)
        if self.flip:
            flipped = torch.rand(n, 1, generator=g) < 0.5
            cols = torch.where(flipped, w - 1 - cols, cols)
        rows = (dy + torch.arange(h)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * p)
        batch = batch.gather(2, rows)
        return batch.gather(3, (dx + cols).view(n, 1, 1, w).expand(n, 3, h, w))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self._augment(self.images[idx])
            memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
            x = torch.addcmul(self.shift, x.float(), self.scale).contiguous(
                memory_format=memory_format
            )
            yield x, self.labels[idx]
