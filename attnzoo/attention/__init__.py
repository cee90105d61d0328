"""Attention modules: one file per module, each registering itself under its short name.

Every module here is imported on package import, so dropping a new file in this folder
(with ``@register_attention("name")``) is all it takes to make it reachable through
``attnzoo.create_attention`` and the CLI.
"""

import importlib
import pkgutil

from .cbam import CBAM
from .eca import EfficientChannelAttention
from .ham import HAM
from .se import SqueezeExcite

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CBAM", "EfficientChannelAttention", "HAM", "SqueezeExcite"]
