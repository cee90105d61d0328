"""Attention modules. Each file registers one module under its short name."""

from .cbam import CBAM
from .eca import EfficientChannelAttention
from .ham import HAM
from .se import SqueezeExcite

__all__ = ["CBAM", "EfficientChannelAttention", "HAM", "SqueezeExcite"]
