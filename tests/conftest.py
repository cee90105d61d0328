"""Fixtures shared by the data, training and CLI tests: real CIFAR and tiny generated CIFAR,
and ``device``, which runs a test on the CPU and, where CUDA is present, on the GPU (the
CUDA cases carry the ``cuda`` marker: ``pytest -m cuda`` runs only them, on a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnzoo.data import save_split

# The read-only data folder sits beside the repository: <root>/../shared/datasets.
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real cifar10/ and cifar100/ splits, unpacked once per session.

    ``ATTNZOO_TEST_DATA`` names an already unpacked root to reuse (it must hold
    ``cifar10/train.npz``); otherwise ``shared/datasets/unpack.py`` writes one (~10 s).
    """
    given = os.environ.get("ATTNZOO_TEST_DATA")
    if given and (Path(given) / "cifar10" / "train.npz").is_file():
        return Path(given)
    unpack = SHARED_DATASETS / "unpack.py"
    if not unpack.is_file():
        pytest.skip(f"real CIFAR data not available ({SHARED_DATASETS} is absent)")
    root = tmp_path_factory.mktemp("cifar_root")
    subprocess.run([sys.executable, str(unpack), str(root)], check=True, capture_output=True)
    return root


@pytest.fixture
def tiny_cifar_root(tmp_path: Path) -> Path:
    """A data root with small random cifar10 splits: 64 train and 32 test images, labels 0..9."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(n) % 10
        save_split(tmp_path / "cifar10" / f"{split}.npz", images, labels)
    return tmp_path


@pytest.fixture
def crash_after_saves(monkeypatch: pytest.MonkeyPatch):
    """``arm(count, exc)``: the training loop's ``count``-th checkpoint save raises ``exc``
    right after the file is written, as a crash would; returns the list of saved steps."""
    from attnzoo.train import engine

    def arm(count: int, exc: type[BaseException] = KeyboardInterrupt) -> list[int]:
        saves: list[int] = []
        real_save = engine.save_checkpoint

        def save_then_crash(path, state):
            real_save(path, state)
            saves.append(state["step"])
            if len(saves) == count:
                raise exc

        monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
        return saves

    return arm


# torch's own bf16 kernels that need the CPU's native instruction set: on a CPU with AMX, a
# forced lower capability (ATEN_CPU_CAPABILITY=avx2, to check the suite against AVX2 kernels)
# makes bf16 scaled_dot_product_attention fail inside torch. Not a fault of ours, and only
# under that forced setting.
FORCED_CAPABILITY_ERRORS = ("pack_vnni2 is only supported when avx512 is supported",)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    try:
        return (yield)
    except RuntimeError as e:
        forced = os.environ.get("ATEN_CPU_CAPABILITY")
        if forced and any(text in str(e) for text in FORCED_CAPABILITY_ERRORS):
            pytest.skip(
                f"torch's bf16 CPU kernel cannot run with ATEN_CPU_CAPABILITY={forced} on this "
                f"CPU ({torch.backends.cpu.get_cpu_capability()} forced): {str(e)[:120]}"
            )
        raise


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module of small models: on a shared 2-core machine a
    second thread only adds contention. Restored afterwards. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CUDA_AVAILABLE = torch.cuda.is_available()
# The devices every device-parametrised test runs on. Without a GPU (CI) the CUDA case is
# skipped at collection time, so the CPU suite costs the same as before.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """``torch.device('cpu')``, then ``torch.device('cuda')`` where a GPU is present."""
    return torch.device(request.param)
