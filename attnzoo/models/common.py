"""Pieces every backbone's blocks share: how a block builds and applies its attention
module, and the two kinds of shortcut."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import attention_level, create_attention

# (channels, earlier_channels) -> module. ``earlier_channels`` lists the channel counts of
# the block's intermediate outputs that a block-level attention (bridge) reads as well.
AttentionFactory = Callable[..., nn.Module]
SHORTCUTS = ("A", "B")


def no_attention(channels: int, earlier_channels: Sequence[int] = ()) -> nn.Module:
    return nn.Identity()


def attention_factory(attention: str | None, attention_kwargs: dict | None) -> AttentionFactory:
    """(channels, earlier_channels=()) -> module: the named attention, or ``nn.Identity``.

    Module-level attentions ignore ``earlier_channels``; block-level ones are built with it.
    """
    kwargs = dict(attention_kwargs or {})
    if attention is None:
        return no_attention
    level = attention_level(attention)
    if level == "model":
        raise ValueError(f"{attention!r} is a model-level attention; it does not go in a block")
    if level == "conv":
        raise ValueError(f"{attention!r} replaces a convolution; build it with conv_factory")
    if level == "block":
        if "earlier_channels" in kwargs:
            raise ValueError("earlier_channels is set by the backbone, not by attention_kwargs")

        def build_block_level(channels: int, earlier_channels: Sequence[int] = ()) -> nn.Module:
            return create_attention(
                attention, channels, earlier_channels=tuple(earlier_channels), **kwargs
            )

        return build_block_level

    def build(channels: int, earlier_channels: Sequence[int] = ()) -> nn.Module:
        return create_attention(attention, channels, **kwargs)

    return build


# (in_channels, out_channels, stride, groups) -> module replacing a block's 3x3 conv, or None
ConvFactory = Callable[..., nn.Module] | None


def conv_factory(attention: str | None, attention_kwargs: dict | None) -> ConvFactory:
    """The builder of a conv-level attention (selective kernel) for a block's 3x3 conv, or
    None when ``attention`` is not conv-level (the block keeps its plain conv)."""
    if attention is None or attention_level(attention) != "conv":
        return None
    kwargs = dict(attention_kwargs or {})
    taken = sorted({"out_channels", "stride", "groups"} & set(kwargs))
    if taken:
        raise ValueError(f"{', '.join(taken)} of {attention!r} are set by the backbone's block")

    def build(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Module:
        return create_attention(
            attention, in_channels, out_channels=out_channels, stride=stride, groups=groups,
            **kwargs,
        )  # fmt: skip

    return build


def attend(module: nn.Module, x: torch.Tensor, earlier: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply a block's attention to ``x``; a block-level module also gets ``earlier``, the
    block's intermediate outputs (in the order of the ``earlier_channels`` it was built with)."""
    if getattr(module, "reads_earlier", False):
        return module(x, earlier)
    return module(x)


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
