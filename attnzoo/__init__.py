"""attnzoo: attention-augmented CNNs for image classification."""

from . import attention, models  # noqa: F401  (registers modules and models)
from .convert import load_official
from .registry import create_attention, create_model, list_attentions, list_models

__version__ = "0.1.0"
__all__ = [
    "create_attention",
    "create_model",
    "list_attentions",
    "list_models",
    "load_official",
    "__version__",
]
