"""Shared by the device tests of modules and models (tests/attention/test_device.py,
tests/models/test_model_device.py)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OnlyOn(TorchDispatchMode):
    """Records every op (forward and backward) whose tensor results are not on ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.stray: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != self.device.type:
                self.stray.append(f"{func} -> {t.device.type} {tuple(t.shape)} {t.dtype}")
        return out
