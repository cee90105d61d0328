"""Training and evaluation: config, schedule, loop, checkpoints."""

from .checkpoint import RunError
from .config import TrainConfig, list_recipes, load_recipe, resolve_config
from .engine import Interrupted, evaluate, evaluate_run, resume, train

__all__ = [
    "Interrupted",
    "RunError",
    "TrainConfig",
    "evaluate",
    "evaluate_run",
    "list_recipes",
    "load_recipe",
    "resolve_config",
    "resume",
    "train",
]
