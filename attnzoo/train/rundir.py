"""A run directory's lifecycle: claim it for one process, check it, clean up after.

``claimed_run_dir(out, ctx, fresh)`` holds ``out/run.lock`` (an ``flock``, rank 0 only) while a
run trains in ``out``; before any training it checks that ``out`` is (or can become) a
writable directory, that no live process holds it and, for a fresh run, that it holds no
other run; it clears the temporary files a killed writer left. ``RUN_FILES`` are the files a
run writes (each replaced atomically).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..utils.io import (
    DirectoryLock,
    LockedError,
    check_writable,
    describe_os_error,
    remove_temp_files,
)
from .checkpoint import RunError
from .distributed import DistContext, on_main

RUN_FILES = [
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "model_ema.safetensors",  # with ema_decay
    "checkpoint.pt",
]
LOCK_FILE = "run.lock"


def _check_fresh(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")
    # A run counts once it has a checkpoint; a run that died in its first epoch (config.yaml
    # only) is simply started again.
    if out.is_dir() and (out / "checkpoint.pt").exists():
        raise RunError(
            f"{out} already holds a run; continue it with --resume {out} or choose another --out"
        )


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest last."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return list(reversed(missing))


@contextlib.contextmanager
def claimed_run_dir(out: Path, ctx: DistContext, fresh: bool) -> Iterator[None]:
    """Hold ``out/run.lock`` while training in ``out`` (rank 0 only; the others write nothing).

    Checks, before any training: ``out`` is (or can become) a writable directory; no live
    process holds its lock (a lock left by a dead process is free: the kernel dropped it);
    for a fresh run, it holds no other run. Clears temp files a killed writer left. On the
    way out the lock file goes, and so do directories made here if nothing was written.
    """
    lock = DirectoryLock(out / LOCK_FILE)
    created: list[Path] = []

    def claim() -> None:
        try:
            if out.exists() and not out.is_dir():
                raise RunError(f"--out {out} exists and is not a directory")
            check_writable(out)
            created.extend(_make_dirs(out))
            lock.acquire()
        except LockedError as e:
            raise RunError(
                f"{out} is in use by {e.holder}, which holds {lock.path}; wait for it to "
                f"finish or stop it first"
            ) from None
        except OSError as e:
            _remove_empty(created)
            raise RunError(
                f"cannot write to {out}: {describe_os_error(e)}; choose another --out or make "
                f"it writable"
            ) from e
        try:
            if fresh:
                _check_fresh(out)
            remove_temp_files(out, RUN_FILES)
        except BaseException:
            lock.release()
            _remove_empty(created)
            raise

    on_main(ctx, claim)
    try:
        yield
    finally:
        if ctx.is_main:
            lock.release()
            _remove_empty(created)


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()  # only succeeds if empty: a failed start leaves nothing behind
        except OSError:
            return
