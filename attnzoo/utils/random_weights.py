"""Random, non-trivial weights for equality checks.

Zero- or identity-initialised gates (a BAM or GC branch that starts at zero, a BN whose
running statistics are still (0, 1)) hide whole branches from a comparison between two
implementations, or between eager PyTorch and an exported graph. ``randomize_`` fills every
parameter with N(0, 1/fan_in) (so gates stay away from saturation and deep ResNets do not
blow up) and gives every BatchNorm a scale near 1, a shift near 0 and running statistics
away from (0, 1). It draws from the global RNG, so ``torch.manual_seed`` fixes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["randomize_"]


def randomize_(module: nn.Module) -> nn.Module:
    """Fill ``module``'s parameters and BN running statistics in place; returns it."""
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 4
            param.normal_(0.0, 1.0 / math.sqrt(fan_in))
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                if bn.weight is not None:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.5, 0.5)
                if bn.running_mean is not None:
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
    return module
