"""The one place that knows what a model's forward may return during training.

A model returns a logits tensor, or, in training mode, a tuple whose first item is the
main logits and whose other items are auxiliary logits trained with the same
cross-entropy and summed (ABN: L = L_per + L_att). Everything that trains a model calls
``training_loss``; everything that reads predictions calls ``main_logits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ModelOutput = torch.Tensor | tuple[torch.Tensor, ...]


def main_logits(output: ModelOutput) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def training_loss(output: ModelOutput, target: torch.Tensor, **ce_kwargs) -> torch.Tensor:
    """Sum of the cross-entropy of every logits tensor in ``output``."""
    outputs = output if isinstance(output, tuple) else (output,)
    loss = F.cross_entropy(outputs[0], target, **ce_kwargs)
    for extra in outputs[1:]:
        loss = loss + F.cross_entropy(extra, target, **ce_kwargs)
    return loss
