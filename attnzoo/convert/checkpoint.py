"""Reading checkpoint files safely, and unwrapping the usual training-script wrappers.

``load_checkpoint(path)`` reads a ``.safetensors`` file with safetensors and anything else
with ``torch.load(path, weights_only=True, map_location="cpu")``, which unpickles tensors and
plain containers only: a file that would run or build any other object is refused
(``ValueError``) instead of executed. ``unwrap_state_dict`` then takes the state_dict out of
``{"state_dict": ..., "epoch": ..., "optimizer": ...}`` (or ``{"model": ...}``,
``{"model_state_dict": ...}``) and drops the ``module.`` prefix that ``nn.DataParallel`` and
``DistributedDataParallel`` put on every key (the official CBAM, BAM, ECA and triplet
checkpoints have both).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
PARALLEL_PREFIXES = ("module.",)


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint object: unwrapped from ``{"state_dict": ...}``
    (also ``"model"``, ``"model_state_dict"``) and without a ``module.`` prefix that every
    key carries. Raises ``ValueError`` if what is left is not a mapping of names to tensors."""
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"expected a state_dict (a mapping of parameter names to tensors), or a checkpoint "
            f"that wraps one under {' / '.join(repr(k) for k in WRAPPER_KEYS)}; got "
            f"{type(obj).__name__}" + (" (empty)" if isinstance(obj, Mapping) else "")
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"not a state_dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}: "
            f"{type(obj[bad[0]]).__name__}); pass the checkpoint's state_dict"
        )
    state = dict(obj)
    for prefix in PARALLEL_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely and return its unwrapped state_dict (on the CPU).

    ``.safetensors``: ``safetensors.torch.load_file``. Anything else: ``torch.load`` with
    ``weights_only=True`` (tensors and plain Python containers only; the legacy pre-1.6 format
    of the official checkpoints included). A pickle that holds other objects is refused with
    a ``ValueError``; if you trust its origin, unpickle it yourself and pass the state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint, and "
            f"torch.load(weights_only=True) will not unpickle the objects in it ({first}). "
            "Unpickling it in full could run arbitrary code; if you trust the file, load it "
            "yourself with torch.load(..., weights_only=False) and pass its state_dict"
        ) from err
    return unwrap_state_dict(obj)
