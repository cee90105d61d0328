"""Shared helpers for the attention tests: random weights and a by-hand BatchNorm."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn


def _randomize(module: nn.Module) -> nn.Module:
    """Fill every parameter and BN running stat with random, non-trivial values.

    Weights get std 1/sqrt(fan_in) so gates stay away from saturation; BN gets a scale
    around 1, a shift around 0 and running stats away from (0, 1).
    """
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 4
            param.normal_(0.0, 1.0 / math.sqrt(fan_in))
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return module


def _batch_norm_by_hand(
    maps: torch.Tensor, bn: nn.BatchNorm2d, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN of a one-channel stack ``maps`` (M, 1, H, W) with the module's affine and eps.

    Returns (normalised maps, mean, unbiased variance). In training mode the statistics are
    the batch's, over all M*H*W values (the biased variance normalises, the unbiased one is
    what BN folds into its running estimate); in eval mode they are the running stats.
    """
    assert maps.shape[1] == 1
    values = maps.flatten()
    if training:
        mean = values.sum() / values.numel()
        var = ((values - mean) ** 2).sum() / values.numel()
        unbiased = ((values - mean) ** 2).sum() / (values.numel() - 1)
    else:
        mean = bn.running_mean.detach().double()[0]
        var = bn.running_var.detach().double()[0]
        unbiased = var
    gamma = bn.weight.detach().double()[0]
    beta = bn.bias.detach().double()[0]
    return (maps - mean) / torch.sqrt(var + bn.eps) * gamma + beta, mean, unbiased


@pytest.fixture
def randomize() -> Callable[[nn.Module], nn.Module]:
    return _randomize


@pytest.fixture
def batch_norm_by_hand() -> Callable:
    return _batch_norm_by_hand


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one intra-op thread: these tensors are tiny, so fanning out to threads costs more
    than it saves (several times over when other jobs share the CPU). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
