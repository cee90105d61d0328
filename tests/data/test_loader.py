"""The in-memory loader (attnzoo/data/loader.py), checked against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.data import InMemoryLoader

# With mean 0 and std 1/255 the normalisation is the identity on raw pixel values, so the
# output can be compared with the uint8 source exactly.
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def random_images(n: int, h: int = 8, w: int = 6, seed: int = 0) -> np.ndarray:
    # Values 1..255 so that no source pixel looks like zero padding.
    return np.random.default_rng(seed).integers(1, 256, size=(n, h, w, 3), dtype=np.uint8)


def collect(loader: InMemoryLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def find_window(out: np.ndarray, source: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) such that ``out`` (H, W, 3) is a window of the zero-padded source."""
    h, w, _ = source.shape
    padded = np.pad(source, ((pad, pad), (pad, pad), (0, 0)))
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if np.array_equal(out, window[:, ::-1] if flipped else window):
                    hits.append((dy, dx, flipped))
    return hits


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize(
    "n,batch,train,sizes",
    [
        (100, 32, True, [32, 32, 32]),  # drop_last in training
        (100, 32, False, [32, 32, 32, 4]),  # ragged last batch kept at test
        (96, 32, True, [32, 32, 32]),
        (10, 32, True, [10]),  # fewer images than one batch: keep them
        (1, 4, False, [1]),
    ],
)
def test_batch_sizes(n, batch, train, sizes):
    loader = InMemoryLoader(random_images(n), np.arange(n), batch, **RAW, train=train)
    assert len(loader) == len(sizes) and loader.num_samples == n
    batches = list(loader)
    assert [len(y) for _, y in batches] == sizes
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 6)
        assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]


def test_explicit_drop_last_overrides_default():
    loader = InMemoryLoader(random_images(10), np.arange(10), 4, **RAW, drop_last=True)
    assert [len(y) for _, y in loader] == [4, 4]
    loader = InMemoryLoader(random_images(10), np.arange(10), 4, **RAW, train=True, drop_last=False)
    assert [len(y) for _, y in loader] == [4, 4, 2]


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryLoader(random_images(4), np.arange(4), 0, **RAW)


def test_test_loader_is_ordered_and_unaugmented():
    images = random_images(20)
    loader = InMemoryLoader(images, np.arange(20), 8, **RAW, pad=2, flip=True, train=False)
    x, y = collect(loader)
    np.testing.assert_array_equal(y.numpy(), np.arange(20))
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), images.astype(np.float32))


# ------------------------------------------------------------------ normalisation


def test_constant_image_at_the_mean_normalises_to_zero():
    mean = (100 / 255, 50 / 255, 200 / 255)
    std = (0.2, 0.3, 0.25)
    images = np.empty((4, 5, 5, 3), np.uint8)
    images[:] = [100, 50, 200]
    loader = InMemoryLoader(images, np.zeros(4), 4, mean, std, train=True, pad=0, flip=False)
    ((x, _),) = list(loader)
    assert x.abs().max() < 1e-5


def test_normalisation_matches_numpy():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    images = random_images(6)
    ((x, _),) = list(InMemoryLoader(images, np.zeros(6), 8, mean, std))
    expected = (images.astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("pad,flip", [(2, False), (2, True), (0, True), (3, True)])
def test_crop_is_a_window_of_the_padded_image(pad, flip):
    n = 96
    images = random_images(n, h=8, w=6)  # not square: a swapped H/W would show
    loader = InMemoryLoader(images, np.arange(n), 32, **RAW, train=True, pad=pad, flip=flip)
    x, y = collect(loader)
    out = x.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out, out.round())  # whole pixel values: nothing interpolated
    offsets, flips = set(), 0
    for img, label in zip(out.astype(np.uint8), y.tolist(), strict=True):
        hits = find_window(img, images[label], pad)
        assert len(hits) == 1, f"image {label}: matches {hits}"
        dy, dx, flipped = hits[0]
        assert flip or not flipped
        offsets.add((dy, dx))
        flips += flipped
    if pad:
        # 96 draws from (2p+1)^2 offsets: almost all of them occur
        assert len(offsets) >= 0.5 * (2 * pad + 1) ** 2
    if flip:
        assert 0.3 * n < flips < 0.7 * n


def test_about_half_the_images_are_flipped():
    n = 2000
    images = random_images(n, h=3, w=4)
    loader = InMemoryLoader(images, np.arange(n), 500, **RAW, train=True, pad=0, flip=True)
    x, y = collect(loader)
    out = x.permute(0, 2, 3, 1).numpy()
    source = images[y.numpy()]
    same = np.all(out == source, axis=(1, 2, 3))
    mirrored = np.all(out == source[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    # Binomial(2000, 1/2): 1000 +- 22 (1 sigma); allow 5 sigma
    assert abs(mirrored.sum() - n / 2) < 5 * np.sqrt(n) / 2


def test_no_augmentation_without_pad_and_flip():
    images = random_images(32)
    loader = InMemoryLoader(images, np.arange(32), 8, **RAW, train=True, pad=0, flip=False)
    x, y = collect(loader)
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), images[y.numpy()])


# ------------------------------------------------------------------ shuffling and seeds


def epochs(seed: int, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = InMemoryLoader(
        random_images(64), np.arange(64), 16, **RAW, train=True, pad=2, flip=True, seed=seed
    )
    return [collect(loader) for _ in range(count)]


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = epochs(0), epochs(0), epochs(1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][1], c[0][1])
    assert not torch.equal(a[0][0], c[0][0])
    # and two epochs of one loader differ
    assert not torch.equal(a[0][1], a[1][1])


def test_generator_state_restores_the_batches():
    loader = InMemoryLoader(
        random_images(64), np.arange(64), 16, **RAW, train=True, pad=2, flip=True, seed=5
    )
    collect(loader)
    state = loader.generator.get_state()
    x1, y1 = collect(loader)
    loader.generator.set_state(state)
    x2, y2 = collect(loader)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("n,batch", [(96, 32), (100, 32)])
def test_every_sample_once_per_epoch(n, batch):
    loader = InMemoryLoader(random_images(n), np.arange(n), batch, **RAW, train=True, seed=3)
    for _ in range(3):
        _, y = collect(loader)
        assert len(y) == n - n % batch
        assert len(set(y.tolist())) == len(y)  # no repeats
    # with n divisible by the batch, every sample appears exactly once
    if n % batch == 0:
        assert sorted(y.tolist()) == list(range(n))


def test_shuffle_is_a_permutation_not_the_identity():
    loader = InMemoryLoader(random_images(64), np.arange(64), 64, **RAW, train=True)
    _, y = collect(loader)
    assert sorted(y.tolist()) == list(range(64)) and y.tolist() != list(range(64))


# ------------------------------------------------------------------ memory format


@pytest.mark.parametrize("train", [True, False])
def test_channels_last(train):
    images = random_images(8)
    loader = InMemoryLoader(images, np.arange(8), 4, **RAW, train=train, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.stride()[1] == 1
    plain = InMemoryLoader(images, np.arange(8), 4, **RAW, train=train)
    x, _ = next(iter(plain))
    assert x.is_contiguous()
