"""Pieces every backbone shares: how an attention module is plugged in, and shortcuts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import create_attention

AttentionFactory = Callable[[int], nn.Module]
SHORTCUTS = ("A", "B")


def attention_factory(attention: str | None, attention_kwargs: dict | None) -> AttentionFactory:
    """channels -> module: the named attention, or ``nn.Identity`` when there is none."""
    kwargs = dict(attention_kwargs or {})
    if attention is None:
        return lambda channels: nn.Identity()
    return lambda channels: create_attention(attention, channels, **kwargs)


def check_shortcut(shortcut: str) -> str:
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; choose one of: {', '.join(SHORTCUTS)}")
    return shortcut


class PadShortcut(nn.Module):
    """Option A shortcut (He et al. 2016): strided identity, extra channels zero-padded."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels
        if self.extra < 0:
            raise ValueError("option A shortcut cannot reduce the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes match, else option A (parameter-free) or B (1x1 conv + BN)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if check_shortcut(kind) == "A":
        return PadShortcut(in_channels, out_channels, stride)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def check_model_input(x: torch.Tensor, in_chans: int, name: str) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"{name} expects images shaped (N, {in_chans}, H, W), got {tuple(x.shape)}"
        )
