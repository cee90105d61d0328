"""Loader share (time in data vs the training step) for resnet20, batch 128, 32x32 generated
uint8 data, channels_last, 2 threads, with the per-image augmentation policies of
docs/training.md; prints the CPU (and the GPU).

    python benchmarks/loader_share.py [fp32|bf16] [cpu|cuda]

On ``cuda`` the data lives on the GPU as the training loop keeps it (``loader.to(device)``)
and every phase ends with ``torch.cuda.synchronize()``, so each is timed with its GPU work
(the loop itself does not synchronise: there the loader's kernels overlap the step's, and
this share is an upper bound).
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from attnzoo.data import InMemoryLoader
from attnzoo.data.augment import build_augment
from attnzoo.registry import create_model
from attnzoo.train.fastpath import autocast
from attnzoo.train.mixing import build_mixing
from attnzoo.utils.machine import describe_machine

precision = sys.argv[1] if len(sys.argv) > 1 else "fp32"
device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
torch.set_num_threads(2)
print(f"CPU: {describe_machine()}, {precision}")
if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    print(
        f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


torch.manual_seed(0)
images = np.random.default_rng(0).integers(0, 256, (128 * 12, 32, 32, 3), dtype=np.uint8)
labels = np.random.default_rng(1).integers(0, 10, 128 * 12)
cases = {
    "crop+flip (papers)": (None, None),
    "+ trivialaugment + erasing 0.25": (build_augment("trivialaugment", random_erasing=0.25), None),
    "+ randaugment(2, 9) + erasing 0.25": (build_augment("randaugment", random_erasing=0.25), None),
    "modern_cifar (TA + erasing + mixup/cutmix)": (
        build_augment("trivialaugment", random_erasing=0.25),
        build_mixing(10, mixup_alpha=0.8, cutmix_alpha=1.0),
    ),
}
for name, (augment, mixing) in cases.items():
    model = create_model("resnet20", num_classes=10).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = InMemoryLoader(
        images,
        labels,
        128,
        (0.5,) * 3,
        (0.25,) * 3,
        train=True,
        pad=4,
        flip=True,
        channels_last=True,
    ).to(device)
    loader.set_augment(augment)
    data_t = step_t = 0.0
    it = iter(loader)
    for i in range(len(loader)):
        sync()
        t0 = time.perf_counter()
        x, y = next(it)
        target = y
        if mixing is not None:
            x, target = mixing(x, y)
        sync()
        t1 = time.perf_counter()
        with autocast(precision, device):
            loss = F.cross_entropy(model(x), target, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if i >= 2:  # warm-up steps not counted
            data_t += t1 - t0
            step_t += t2 - t1
    n = len(loader) - 2
    print(
        f"{precision:5s} {name:45s} data {1000 * data_t / n:6.1f} ms/batch  step "
        f"{1000 * step_t / n:6.1f} ms  loader share {100 * data_t / (data_t + step_t):4.1f}%"
    )
