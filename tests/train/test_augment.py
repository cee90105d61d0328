"""attnzoo/data/augment.py: TrivialAugment / RandAugment per image (torchvision's ops, the
loader's generator) and random erasing, in the in-memory loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnzoo.data import InMemoryLoader
from attnzoo.data.augment import SampleAugment, attach_augment, build_augment


def images(n: int = 64, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def test_off_by_default():
    assert build_augment() is None


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment"])
def test_grouped_ops_equal_torchvision_applied_image_by_image(policy):
    augment = SampleAugment(policy, rand_augment_ops=2, rand_augment_magnitude=9)
    x = images()
    draws = augment.draw(len(x), 32, 32, torch.Generator().manual_seed(1))
    got = augment.apply_policy(x, draws)
    p = augment.policy
    for i in range(len(x)):
        want = x[i]
        for slot in range(augment.ops_per_image):
            name = augment.op_names[draws.ops[i, slot]]
            bin_, negative = int(draws.bins[i, slot]), int(draws.negative[i, slot])
            magnitude = augment._magnitude(name, bin_, negative, 32, 32)
            want = p._apply_image_or_video_transform(
                want, name, magnitude, interpolation=p.interpolation, fill=p._fill
            )
        assert torch.equal(got[i], want), i
    assert not torch.equal(got, x)
    if policy == "randaugment":
        assert (draws.bins == 9).all()
    else:
        assert draws.bins.unique().numel() > 10  # magnitudes drawn per image


def test_draws_are_the_generators():
    augment = SampleAugment("trivialaugment", random_erasing=0.5)
    a = augment.draw(16, 32, 32, torch.Generator().manual_seed(4))
    b = augment.draw(16, 32, 32, torch.Generator().manual_seed(4))
    assert all(torch.equal(u, v) for u, v in zip(vars(a).values(), vars(b).values(), strict=True))


def test_random_erasing_boxes_follow_torchvision_ranges():
    augment = SampleAugment(random_erasing=1.0)
    x = torch.ones(256, 3, 32, 24)
    draws = augment.draw(len(x), 32, 24, torch.Generator().manual_seed(0))
    erased = augment.apply_erasing(x, draws)
    zero = erased == 0
    assert zero.any(dim=(1, 2, 3)).all()  # p=1: every image (a box always fits in 10 tries)
    assert (zero.all(dim=1) | ~zero.any(dim=1)).all()  # all channels alike
    top, left, h, w = draws.erase.unbind(1)
    area = (h * w).float() / (32 * 24)
    assert (area > 0.01).all() and (area < 0.36).all()
    assert ((top + h) <= 32).all() and ((left + w) <= 24).all()
    assert (zero.flatten(1).sum(1) == 3 * h * w).all()
    none = SampleAugment(random_erasing=0.25).draw(400, 32, 32, torch.Generator().manual_seed(0))
    assert 0.15 < (none.erase[:, 2] > 0).float().mean() < 0.35


def test_loader_applies_it_and_resumes_inside_an_epoch():
    data = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True, pad=2, flip=True, seed=7)

    def loader(augment=None):
        made = InMemoryLoader(data, np.arange(40), 8, **common)
        made.set_augment(augment)
        return made

    plain = next(iter(loader()))[0]
    augmented = loader(build_augment("trivialaugment", random_erasing=0.5))
    it = iter(augmented)
    first = next(it)[0]
    assert not torch.equal(first, plain)
    state = augmented.state_dict()
    rest = [b for b, _ in it]
    again = loader(build_augment("trivialaugment", random_erasing=0.5))
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for (b, _), a in zip(again, rest, strict=True))


def test_the_test_loader_and_folder_datasets_refuse_it():
    test = InMemoryLoader(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4), 2, (0.5,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="training loader only"):
        test.set_augment(build_augment("randaugment"))
    with pytest.raises(ValueError, match="in-memory datasets .* not on imagenet"):
        attach_augment(object(), build_augment("randaugment"), "imagenet")
