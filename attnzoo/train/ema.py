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
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


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


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA copy of ``model`` (weights and BN buffers), or None when ``decay`` is 0."""
    check_ema(decay)
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
