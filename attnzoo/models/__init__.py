"""Backbones. Each file registers its models under their short names.

Every file here is imported on package import, so a new backbone file (with
``@register_model("name")``) is all it takes to make it reachable through
``attnzoo.create_model`` and the CLI.
"""

import importlib
import pkgutil

from .backbone import Backbone
from .cifar_resnet import BasicBlock, CifarResNet

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Backbone", "BasicBlock", "CifarResNet"]
