"""An exponential moving average (EMA) of the weights, evaluated beside the raw weights.

``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``, updated after
every optimizer step::

    ema_0 = w_1                                  (the first update copies the weights)
    ema_t = decay * ema_{t-1} + (1 - decay) * w_t

Batch norm: ``use_buffers=True``, so the running means and variances are averaged with the
same decay as the weights (as timm's ModelEmaV3 does) and the EMA model is evaluated with
its own statistics, with no extra pass over the data (``swa_utils.update_bn`` would need one
per evaluation). ``num_batches_tracked`` is averaged too (integer arithmetic); our BN layers
use a fixed momentum and never read it.

The EMA model is kept in fp32 on the model's device and memory format, never compiled, and
is updated from the raw (not DDP-wrapped) model, whose weights are the same on every
process. Its state (weights, buffers and the update count) is in every checkpoint, so a
resumed run continues the same average; each epoch's evaluation adds ``test_*_ema`` metrics,
and the run directory gets ``model_ema.safetensors`` beside ``model.safetensors``.

``WeightEma`` is torch's ``AveragedModel`` with one change: its update does not read the
update count back from the device (torch's tests ``n_averaged == 0`` on every update, a host
synchronisation per training step on a GPU). It keeps a Python copy of the count, refreshed
when a checkpoint is loaded, and otherwise runs torch's code path (the same grouped
``multi_avg_fn`` calls), so its averages are bitwise torch's.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype


def check_ema(decay: float) -> None:
    """Validate ``ema_decay``: 0 (off) or a number in (0, 1)."""
    if (
        not isinstance(decay, (int, float))
        or isinstance(decay, bool)
        or not math.isfinite(decay)
        or not 0 <= decay < 1
    ):
        raise ValueError(
            f"ema_decay must be in [0, 1), e.g. 0.999 (0: no weight EMA); got {decay!r}"
        )


class WeightEma(AveragedModel):
    """``AveragedModel(model, multi_avg_fn=..., use_buffers=True)`` without a host
    synchronisation per update (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.updates = 0  # n_averaged, on the host

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = [
            p.detach() for p in itertools.chain(self.module.parameters(), self.module.buffers())
        ]
        theirs = [
            p.detach().to(o.device)
            for o, p in zip(ours, itertools.chain(model.parameters(), model.buffers()), strict=True)
        ]
        if self.updates == 0:
            for o, p in zip(ours, theirs, strict=True):
                o.copy_(p)
        else:
            groups = _group_tensors_by_device_and_dtype([ours, theirs])
            for (device, _), ([own, current], _) in groups.items():
                self.multi_avg_fn(own, current, self.n_averaged.to(device))
        self.n_averaged += 1
        self.updates += 1

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self.updates = int(self.n_averaged)  # once per resume
        return result


def build_ema(model: nn.Module, decay: float) -> WeightEma | None:
    """An EMA copy of ``model`` (weights and BN buffers), or None when ``decay`` is 0."""
    check_ema(decay)
    if decay == 0:
        return None
    return WeightEma(model, decay)
