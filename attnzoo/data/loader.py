"""Batched in-memory loader (after the design of KellerJordan/cifar10-airbench).

The whole split is one uint8 tensor in memory. Each batch is cut out with one gather that
does the random crop (zero padding ``pad`` pixels on each side) and the horizontal flip
together, then converted to float and normalised with one fused multiply-add. Shuffling
and augmentation draw from one seeded ``torch.Generator``, whose state is saved with
checkpoints so that a resumed run sees the same batches.

Exact resume inside an epoch: ``state_dict()`` holds the generator, the epoch's order and
how many batches were handed out, so ``load_state_dict()`` continues with the next batch
exactly as the uninterrupted run would (same samples, same crops and flips).

Data-parallel sharding (``rank``, ``world_size``): every process holds the whole split and
the same generator, so every process draws the same order and the same augmentation for the
whole global batch of ``batch_size``; each then keeps its contiguous slice. The generators
stay in lockstep, every sample is seen once per epoch by exactly one process, and the
samples and their augmentation are those of a single-process run with the same seed.

Per-sample policies (``augment.py``: TrivialAugment / RandAugment on the uint8 batch after
the crop and flip, random erasing after normalising) are set with ``set_augment``; their
choices come from the same generator, after the crop and flip draws of each batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import SampleAugment
from .base import SplitLoader


class InMemoryLoader(SplitLoader):
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
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(
            torch.from_numpy(np.asarray(labels, dtype=np.int64)),
            batch_size,
            mean,
            std,
            train,
            seed,
            drop_last,
            channels_last,
            rank,
            world_size,
        )
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.pad = pad if train else 0
        self.flip = flip and train
        # Within-epoch position: the current epoch's order and the batches handed out so far
        # (order is None between epochs); ``_resume_at`` is a loaded state that the next
        # ``iter()`` continues instead of starting a new epoch.
        self._order: torch.Tensor | None = None
        self._position = 0
        self._resume_at: tuple[torch.Tensor, int] | None = None
        self.augment: SampleAugment | None = None

    def to(self, device: torch.device | str) -> InMemoryLoader:
        """Move the split (uint8) to ``device`` once; batches are then made there."""
        super().to(device)
        self.images = self.images.to(self.device)
        return self

    def _upload(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """CPU-drawn int64/bool tensors on the loader's device: one pinned, non-blocking copy
        for all of them on CUDA (the GPU never waits for the host), themselves on the CPU."""
        if self.device.type == "cpu":
            return tensors
        flat = torch.cat([t.reshape(-1).long() for t in tensors])
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(self.device, non_blocking=True)
        out, start = [], 0
        for t in tensors:
            part = flat[start : start + t.numel()].view(t.shape)
            out.append(part.bool() if t.dtype == torch.bool else part)
            start += t.numel()
        return tuple(out)

    def set_augment(self, augment: SampleAugment | None) -> None:
        """Per-sample augmentation of the training batches (None: crop and flip only)."""
        if augment is not None and not self.train:
            raise ValueError("per-sample augmentation is for the training loader only")
        self.augment = augment

    def _draw_augmentation(self, n: int) -> tuple[torch.Tensor, ...] | None:
        """Crop offsets (dy, dx) and flip flags for ``n`` images, or None without augmentation."""
        p = self.pad
        if p == 0 and not self.flip:
            return None
        g = self.generator
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=g)
        flipped = torch.rand(n, 1, generator=g) < 0.5 if self.flip else None
        return dy, dx, flipped

    def _augment(self, batch: torch.Tensor, draws: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """Crop and flip ``batch`` with one gather per axis, as ``draws`` say."""
        if draws is None:
            return batch
        dy, dx, flipped = draws
        n, _, h, w = batch.shape
        p = self.pad
        if p:
            batch = F.pad(batch, (p, p, p, p))
        cols = torch.arange(w, device=batch.device).expand(n, w)
        if flipped is not None:
            cols = torch.where(flipped, w - 1 - cols, cols)
        rows = (dy + torch.arange(h, device=batch.device)).view(n, 1, h, 1)
        rows = rows.expand(n, 3, h, w + 2 * p)
        batch = batch.gather(2, rows)
        return batch.gather(3, (dx + cols).view(n, 1, 1, w).expand(n, 3, h, w))

    def _shard(self, m: int) -> slice:
        """This process's contiguous part of a global batch of ``m`` images."""
        return slice(self.rank * m // self.world_size, (self.rank + 1) * m // self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of batches; after ``load_state_dict`` of a mid-epoch state, its rest.

        The position is advanced before each batch is handed out, so a state taken after a
        training step includes that step's batch.
        """
        n = len(self.labels)
        if self._resume_at is not None:
            (order, self._position), self._resume_at = self._resume_at, None
        else:
            order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
            self._position = 0
        self._order = order  # on the CPU: the state_dict holds it
        (order_here,) = self._upload(order)  # once per epoch
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        h, w = self.images.shape[-2:]
        for i in range(self._position, len(self)):
            idx = order_here[i * self.batch_size : (i + 1) * self.batch_size]
            draws = self._draw_augmentation(len(idx))
            extra = None
            if self.augment is not None:
                extra = self.augment.draw(len(idx), h, w, self.generator)
            if self.world_size > 1:
                part = self._shard(len(idx))
                idx = idx[part]
                draws = None if draws is None else tuple(d if d is None else d[part] for d in draws)
                extra = None if extra is None else extra.select(part)
            if draws is not None and self.device.type != "cpu":
                present = [d for d in draws if d is not None]
                moved = iter(self._upload(*present))
                draws = tuple(None if d is None else next(moved) for d in draws)
            x = self._augment(self.images[idx], draws)
            if extra is not None:
                x = self.augment.apply_policy(x, extra)
            x = torch.addcmul(self.shift, x.float(), self.scale)
            if extra is not None:
                x = self.augment.apply_erasing(x, extra)
            x = x.contiguous(memory_format=memory_format)
            self._position = i + 1
            if self._position == len(self):
                self._order, self._position = None, 0  # epoch done: the next one reshuffles
            yield x, self.labels[idx]

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Generator state and position in the epoch; tensors and ints only (weights-only safe)."""
        if self._resume_at is not None:  # loaded but not iterated yet
            order, position = self._resume_at
        elif self._order is not None and self._position > 0:
            order, position = self._order, self._position
        else:
            order, position = None, 0
        return {
            "generator": self.generator.get_state(),
            "order": None if order is None else order.clone(),
            "position": position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``; a state that cannot belong to this data is refused."""
        order, position = state["order"], int(state["position"])
        if order is None:
            if position != 0:
                raise ValueError(f"loader position {position} without an epoch order")
        else:
            n = len(self.labels)
            if (
                not isinstance(order, torch.Tensor)
                or order.dtype != torch.int64
                or order.shape != (n,)
                or not torch.equal(order.sort().values, torch.arange(n))
            ):
                raise ValueError(f"the saved epoch order is not a permutation of {n} samples")
            if not 0 < position < len(self):
                raise ValueError(f"loader position {position} is outside 1..{len(self) - 1}")
            order = order.clone()
        self.generator.set_state(state["generator"])
        self._order, self._position = None, 0
        self._resume_at = None if order is None else (order, position)
