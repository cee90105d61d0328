"""File helpers for run directories.

- Atomic writes: a file is either its old content or its complete new content. The new
  content goes to a temp file in the same directory, which is flushed and fsynced before it
  is renamed over the target, and the directory is fsynced after the rename; a crash or a
  full disk at any point leaves the previous version (and at worst a stray temp file, which
  ``remove_temp_files`` clears).
- ``check_writable``: try creating a file, so that a read-only or full output directory is
  reported before hours of training rather than at the first save.
- ``DirectoryLock``: an ``flock`` on a file in a directory, held while one process works in
  it; the kernel drops it when the process dies, however it dies, so a stale lock file never
  blocks anyone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(fileobj)`` on a temp file, flush, fsync, rename over it.

    Any failure (a full disk included) removes the temp file and leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 - umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently, so a row's second ``model_kwargs`` would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike, error: type[Exception], what: str) -> dict:
    """Parse ``path`` as a YAML mapping (a key given twice is an error); any failure raises
    ``error`` naming ``what``."""
    try:
        values = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__  # YAML errors span lines
        raise error(f"cannot read {what} {path}: {reason}") from e
    if not isinstance(values, dict):
        raise error(f"{what} {path} must be a YAML mapping")
    return values


def remove_temp_files(directory: str | os.PathLike, names: list[str]) -> list[Path]:
    """Delete the temp files ``atomic_write`` leaves when killed while writing one of ``names``."""
    removed = []
    for name in names:
        for tmp in Path(directory).glob(f".{name}.*{TEMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def describe_os_error(e: OSError) -> str:
    """``[Errno 28] No space left on device`` without the file name (callers name the file)."""
    if e.errno is not None and e.strerror:
        return f"[Errno {e.errno}] {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def check_writable(directory: str | os.PathLike) -> None:
    """Raise ``OSError`` unless a file can be created in ``directory`` (or, if it does not exist
    yet, in its nearest existing ancestor, where it would be made).

    A real probe file rather than ``os.access``: that also catches read-only mounts and full
    disks, and is not fooled by running as root.
    """
    target = Path(directory).absolute()
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
    fd, probe = tempfile.mkstemp(prefix=".attnzoo-probe-", suffix=TEMP_SUFFIX, dir=target)
    os.close(fd)
    os.unlink(probe)


class LockedError(Exception):
    """The directory lock is held by another live process (``holder`` says which, if known)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``path``, released on exit or process death.

    The file holds ``pid host`` of the holder for error messages. Releasing deletes the file
    while still holding the lock; a process that opened the old file just before that finds,
    after locking it, that the name now points elsewhere (or nowhere) and tries again, so two
    processes can never both believe they hold the lock.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LockedError(self.path, self._holder()) from None
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # locked a file that its holder deleted meanwhile: try again
        raise LockedError(self.path, "a process that keeps re-creating it")

    def _is_current(self, fd: int) -> bool:
        try:
            on_disk, ours = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino)

    def _holder(self) -> str:
        try:
            pid, _, host = self.path.read_text().strip().partition(" ")
        except OSError:
            return "another process"
        if not pid.isdigit():
            return "another process"
        return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._is_current(self._fd):
                self.path.unlink()
        except OSError:
            pass  # a read-only or vanished directory: the kernel lock still goes with the fd
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
