"""Epoch loggers: views of a run's metrics.jsonl for outside tools (docs/logging.md).

``TrainConfig.log`` names the backends (``[]`` by default; CLI ``--log tensorboard``).
The training loop calls one ``RunLoggers`` object once per epoch, with the same row it
writes to metrics.jsonl, just before that epoch's save; metrics.jsonl stays the record and
a logger only shows it. Only rank 0 logs; on other ranks ``RunLoggers`` holds no backend.

A backend is a class with ``epoch_end(row, model, log)`` and ``close()``. Its package is
imported when the run starts (``require_loggers``), so a missing one stops the run before
any training, with the ``pip install`` line that fixes it.

Resuming: a backend opens its output lazily, at the first epoch it logs, and is told that
epoch, so that whatever an earlier process logged from there on (an epoch logged just
before a crash, then trained again) is superseded rather than duplicated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from .config import TrainConfig
from .distributed import SINGLE, DistContext

LOGGERS = ("tensorboard",)


class EpochLogger(Protocol):
    def epoch_end(self, row: dict[str, Any], model: nn.Module, log: Any) -> None: ...

    def close(self) -> None: ...


def check_log(value: Any) -> list[str]:
    """``TrainConfig.log`` as a list of backend names (a single name may be given as a
    string); a ValueError names the valid choices."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"log must be a list of logger names (choose from: {', '.join(LOGGERS)}), got {value!r}"
        )
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"unknown logger {name!r} in log; choose from: {', '.join(LOGGERS)}")
    if len(set(names)) < len(names):
        raise ValueError(f"log names a logger twice: {names!r}")
    return list(names)


def require_loggers(names: list[str]) -> None:
    """Import each backend's package now (at startup): an ImportError names the fix."""
    if "tensorboard" in names:
        from .tensorboard_log import summary_writer_class

        summary_writer_class()


class RunLoggers:
    """The configured backends of one run directory (none off rank 0), as one logger.

    Use it as a context manager (or call ``close``) so that every backend flushes and
    closes its files, also when training stops on an error or a signal.
    """

    def __init__(
        self, cfg: TrainConfig, out: Path, data: Any = None, ctx: DistContext = SINGLE
    ) -> None:
        self.backends: list[EpochLogger] = []
        if not ctx.is_main:
            return
        for name in cfg.log:
            if name == "tensorboard":
                from .tensorboard_log import TensorBoardLogger

                self.backends.append(TensorBoardLogger(cfg, Path(out), data))

    def epoch_end(self, row: dict[str, Any], model: nn.Module, log: Any = print) -> None:
        """Log one epoch's metrics row (``row["epoch"]`` is the step) for ``model``."""
        for backend in self.backends:
            backend.epoch_end(row, model, log)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
