"""Per-sample augmentation of whole batches: TrivialAugmentWide / RandAugment and random erasing.

The in-memory loader (``loader.py``) crops and flips whole uint8 batches; the policies here
add what differs from image to image:

- ``auto_augment="trivialaugment"``: TrivialAugmentWide (Müller & Hutter, ICCV 2021,
  https://arxiv.org/abs/2103.10158): one op per image from the 14 of torchvision's
  ``TrivialAugmentWide``, a magnitude bin uniform in 0..30 and a random sign.
- ``auto_augment="randaugment"``: RandAugment (Cubuk et al., 2020,
  https://arxiv.org/abs/1909.13719): ``rand_augment_ops`` ops per image from torchvision's
  ``RandAugment`` space, all at magnitude bin ``rand_augment_magnitude`` of 31, random signs.
- ``random_erasing=p``: torchvision ``v2.RandomErasing(p)`` per image (scale 0.02-0.33,
  log-uniform aspect ratio 0.3-3.3, up to 10 tries to fit a box, else the image is kept),
  applied to the normalised float batch with value 0 (the dataset mean), as torchvision's
  default ``value=0`` after ``Normalize`` does.

The ops themselves and their magnitude tables are torchvision's (``transforms.v2``), so the
images come out as torchvision's transforms would make them. What differs is where the
randomness comes from: every choice is drawn, for the whole global batch at once, from the
loader's seeded ``torch.Generator`` instead of torch's global RNG. The loader saves that
generator with each checkpoint, so a resumed run draws the same ops, and data-parallel
processes draw the same choices and each keep their slice (as for crops and flips).

Speed: images that drew the same op and magnitude are transformed together as one batch
(torchvision's ops work per image on batches), so the Python work per batch is one call per
distinct (op, magnitude), not one per image. These many small ops run with one intra-op
thread: with torch's threads on a busy 2-core machine each tiny op paid for waking and
joining the pool, and a batch took 1.1 s instead of 10 ms. docs/training.md has the
measured loader share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")
MAGNITUDE_BINS = 31  # torchvision's default for both policies
ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10


def check_augment(auto_augment: str, ops: int, magnitude: int, random_erasing: float) -> None:
    """Validate the augmentation settings of a TrainConfig (errors name the fix)."""
    if auto_augment not in AUTO_AUGMENTS:
        raise ValueError(
            f"unknown auto_augment {auto_augment!r}; choose one of: {', '.join(AUTO_AUGMENTS)}"
        )
    if not isinstance(ops, int) or isinstance(ops, bool) or not 1 <= ops <= 14:
        raise ValueError(f"rand_augment_ops must be an int in 1..14, got {ops!r}")
    if (
        not isinstance(magnitude, int)
        or isinstance(magnitude, bool)
        or not 0 <= magnitude < MAGNITUDE_BINS
    ):
        raise ValueError(
            f"rand_augment_magnitude must be an int in 0..{MAGNITUDE_BINS - 1}, got {magnitude!r}"
        )
    if (
        not isinstance(random_erasing, (int, float))
        or isinstance(random_erasing, bool)
        or not 0 <= random_erasing <= 1
    ):
        raise ValueError(
            f"random_erasing is the probability of erasing a box per image, in [0, 1]; "
            f"got {random_erasing!r}"
        )


@contextmanager
def one_thread() -> Iterator[None]:
    """torch ops inside run on one intra-op thread (restored after): for many tiny ops."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


@dataclass
class SampleDraws:
    """One batch's random choices, one row per image (a global batch, sliced per process)."""

    ops: torch.Tensor | None  # (n, k) op index into the policy's op list
    bins: torch.Tensor | None  # (n, k) magnitude bin
    negative: torch.Tensor | None  # (n, k) bool: flip the magnitude's sign
    erase: torch.Tensor | None  # (n, 4) int64: top, left, height, width; height 0 = keep

    def select(self, part: slice) -> SampleDraws:
        return SampleDraws(*(None if t is None else t[part] for t in vars(self).values()))


class SampleAugment:
    """A per-image policy on uint8 batches and/or random erasing on normalised float batches."""

    def __init__(
        self,
        auto_augment: str = "none",
        rand_augment_ops: int = 2,
        rand_augment_magnitude: int = 9,
        random_erasing: float = 0.0,
    ) -> None:
        check_augment(auto_augment, rand_augment_ops, rand_augment_magnitude, random_erasing)
        self.auto_augment = auto_augment
        self.random_erasing = float(random_erasing)
        self.magnitude = rand_augment_magnitude
        if auto_augment == "trivialaugment":
            self.policy = v2.TrivialAugmentWide(interpolation=InterpolationMode.NEAREST)
            self.ops_per_image = 1
        elif auto_augment == "randaugment":
            self.policy = v2.RandAugment(
                num_ops=rand_augment_ops,
                magnitude=rand_augment_magnitude,
                interpolation=InterpolationMode.NEAREST,
            )
            self.ops_per_image = rand_augment_ops
        else:
            self.policy = None
            self.ops_per_image = 0
        self.op_names = list(self.policy._AUGMENTATION_SPACE) if self.policy else []

    @property
    def active(self) -> bool:
        return self.policy is not None or self.random_erasing > 0

    # ------------------------------------------------------------ draws
    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> SampleDraws:
        """Every random choice for ``n`` images of ``height x width``, from ``generator``."""
        ops = bins = negative = erase = None
        if self.policy is not None:
            shape = (n, self.ops_per_image)
            ops = torch.randint(len(self.op_names), shape, generator=generator)
            if self.auto_augment == "trivialaugment":
                bins = torch.randint(MAGNITUDE_BINS, shape, generator=generator)
            else:
                bins = torch.full(shape, self.magnitude, dtype=torch.long)
            negative = torch.rand(shape, generator=generator) <= 0.5
        if self.random_erasing > 0:
            erase = self._draw_erasing(n, height, width, generator)
        return SampleDraws(ops, bins, negative, erase)

    def _draw_erasing(self, n: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        """torchvision RandomErasing.make_params, vectorised: the first of 10 tries that fits."""
        apply = torch.rand(n, generator=generator) < self.random_erasing
        u = torch.rand(n, ERASE_TRIES, 4, generator=generator, dtype=torch.float64)
        area = h * w * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[..., 0])
        low, high = torch.tensor(ERASE_RATIO, dtype=torch.float64).log()
        aspect = torch.exp(low + (high - low) * u[..., 1])
        box_h = torch.sqrt(area * aspect).round().long()
        box_w = torch.sqrt(area / aspect).round().long()
        fits = (box_h < h) & (box_w < w)
        top = (u[..., 2] * (h - box_h + 1)).floor().long()
        left = (u[..., 3] * (w - box_w + 1)).floor().long()
        first = fits.long().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none)
        boxes = torch.stack([top, left, box_h, box_w], dim=2)
        chosen = boxes.gather(1, first.unsqueeze(2).expand(n, 1, 4)).squeeze(1)
        keep = ~(apply & fits.any(dim=1))
        chosen[keep] = 0
        return chosen

    # ------------------------------------------------------------ application
    def apply_policy(self, images: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        """The drawn ops on a uint8 ``(n, C, H, W)`` batch; one call per distinct op."""
        if self.policy is None or draws.ops is None:
            return images
        with one_thread():
            return self._apply_policy(images.clone(), draws)

    def _apply_policy(self, images: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        height, width = images.shape[-2:]
        for slot in range(self.ops_per_image):
            ops, bins, negative = draws.ops[:, slot], draws.bins[:, slot], draws.negative[:, slot]
            key = (ops * MAGNITUDE_BINS + bins) * 2 + negative.long()
            for value in torch.unique(key).tolist():
                chosen = (key == value).nonzero().squeeze(1).to(images.device)
                name = self.op_names[value // (2 * MAGNITUDE_BINS)]
                magnitude = self._magnitude(
                    name, (value // 2) % MAGNITUDE_BINS, value % 2, height, width
                )
                images[chosen] = self.policy._apply_image_or_video_transform(
                    images[chosen],
                    name,
                    magnitude,
                    interpolation=self.policy.interpolation,
                    fill=self.policy._fill,
                )
        return images

    def _magnitude(self, name: str, bin_: int, negative: int, height: int, width: int) -> float:
        """The op's magnitude as torchvision computes it (0 for ops without one)."""
        magnitudes_fn, signed = self.policy._AUGMENTATION_SPACE[name]
        magnitudes = magnitudes_fn(MAGNITUDE_BINS, height, width)
        if magnitudes is None:
            return 0.0
        magnitude = float(magnitudes[bin_])
        return -magnitude if signed and negative else magnitude

    def apply_erasing(self, x: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
        """Set each drawn box of a normalised float batch to 0 (the mean); one masked fill."""
        if draws.erase is None:
            return x
        top, left, box_h, box_w = draws.erase.to(x.device, non_blocking=True).unbind(1)
        h, w = x.shape[-2:]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (n, h)
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (n, w)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, h, w)
        return x.masked_fill(mask, 0.0)


def build_augment(
    auto_augment: str = "none",
    rand_augment_ops: int = 2,
    rand_augment_magnitude: int = 9,
    random_erasing: float = 0.0,
) -> SampleAugment | None:
    """The per-sample augmentation of these settings, or None when they ask for none."""
    augment = SampleAugment(auto_augment, rand_augment_ops, rand_augment_magnitude, random_erasing)
    return augment if augment.active else None


def attach_augment(loader: object, augment: SampleAugment | None, dataset: str) -> None:
    """Give a training loader its per-sample augmentation; only the in-memory loader has one."""
    if augment is None:
        return
    if not hasattr(loader, "set_augment"):
        raise ValueError(
            f"auto_augment and random_erasing work on in-memory datasets (CIFAR, STL-10, "
            f"digits), not on {dataset}, whose images are decoded from files; set them to "
            f"null and 0"
        )
    loader.set_augment(augment)
