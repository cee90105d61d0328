"""attnzoo: attention-augmented CNNs for image classification."""

from types import ModuleType

from . import attention, models  # noqa: F401  (registers modules and models)
from .convert import load_official
from .graft import graft
from .registry import create_attention, create_model, list_attentions, list_models
from .timm_layer import timm_layer

__version__ = "0.1.0"
__all__ = [
    "create_attention",
    "create_model",
    "graft",
    "list_attentions",
    "list_models",
    "load_official",
    "timm_layer",
    "__version__",
]


def __getattr__(name: str) -> ModuleType:
    # attnzoo.detection imports torchvision's detection models (~1 s): load it on first use.
    if name == "detection":
        import importlib

        return importlib.import_module(".detection", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
