"""The run directory (attnzoo/train/engine.py, utils/io.py): its lock, unwritable output
directories, and a full disk during a save."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import leftovers

from attnzoo.cli import main
from attnzoo.train import engine, resolve_config
from attnzoo.utils.io import DirectoryLock, LockedError, atomic_write

TINY = ["--dataset", "digits", "--model", "resnet20", "--train-subset", "64"]
TINY += ["--batch-size", "32", "--threads", "1", "--no-progress"]


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("attnzoo: error: ")
    return lines[0]


def write_config(run: Path, **overrides) -> None:
    """A valid config.yaml (enough for --resume to get as far as the lock)."""
    run.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config("digits", dataset="digits", threads=1, **overrides)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ------------------------------------------------------------------ the lock


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()} host\\n".encode())
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def lock_holder(tmp_path):
    """Start another process holding ``run/run.lock``; returns (run dir, process)."""
    run = tmp_path / "run"
    write_config(run)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run / "run.lock")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    proc.kill()
    proc.wait()


def test_train_and_resume_into_a_locked_directory_are_refused(lock_holder, capsys):
    run, holder = lock_holder
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for argv in (["train", *TINY, "--epochs", "1", "--out", run], ["train", "--resume", run]):
        line = one_error_line(*run_cli(argv, capsys)[::2])
        assert f"{run} is in use by process {holder.pid}" in line
        assert str(run / "run.lock") in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_a_stale_lock_of_a_killed_process_does_not_block(lock_holder, capsys):
    run, holder = lock_holder
    holder.kill()  # SIGKILL: no cleanup, run.lock stays behind
    holder.wait()
    assert (run / "run.lock").exists()
    # A fresh run in that directory (it has no checkpoint) trains, then --resume of it works.
    code, out, err = run_cli(["train", *TINY, "--epochs", "1", "--out", run], capsys)
    assert code == 0, err
    code, out, err = run_cli(["train", "--resume", run], capsys)
    assert code == 0 and "done: test error" in out, err
    assert leftovers(run) == []


def test_the_lock_is_held_while_training(tmp_path):
    run = tmp_path / "run"
    held = []

    def log(message: str) -> None:
        if message.startswith("epoch 1/"):
            with pytest.raises(LockedError):
                DirectoryLock(run / "run.lock").acquire()
            held.append((run / "run.lock").read_text().split()[0])

    cfg = resolve_config("ham", dataset="digits", epochs=1, train_subset=64, threads=1)
    engine.train(cfg, run, log=log)
    assert held == [str(os.getpid())]
    assert not (run / "run.lock").exists()


def test_directory_lock(tmp_path):
    path = tmp_path / "x.lock"
    with DirectoryLock(path):
        assert path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(LockedError) as info:
            DirectoryLock(path).acquire()  # another open file: refused even in this process
        assert info.value.holder == f"process {os.getpid()}"
    assert not path.exists()
    with DirectoryLock(path):  # free again
        pass


# ------------------------------------------------------------------ unwritable output


def deny_writes_under(monkeypatch, directory: Path, code: int = errno.EROFS) -> None:
    """Make creating files under ``directory`` fail as a read-only mount would."""
    real_open, real_mkdir = os.open, os.mkdir
    inside = str(directory.resolve())

    def guarded_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.abspath(path).startswith(inside):
            raise OSError(code, os.strerror(code), path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if os.path.abspath(path).startswith(inside):
            raise OSError(code, os.strerror(code), path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def no_training(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(engine, "load_dataset", fail)


@pytest.mark.parametrize("existing", [True, False], ids=["out-exists", "out-to-be-made"])
def test_read_only_output_directory_is_refused_before_training(
    tmp_path, monkeypatch, capsys, existing
):
    parent = tmp_path / "readonly"
    parent.mkdir()
    out = parent / "run"
    if existing:
        out.mkdir()
    deny_writes_under(monkeypatch, parent)
    no_training(monkeypatch)
    line = one_error_line(*run_cli(["train", *TINY, "--out", out], capsys)[::2])
    assert f"cannot write to {out}" in line and "Read-only file system" in line
    monkeypatch.undo()
    assert sorted(p.name for p in parent.iterdir()) == (["run"] if existing else [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_output_directory_without_write_permission(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    no_training(monkeypatch)
    try:
        line = one_error_line(*run_cli(["train", *TINY, "--out", locked / "run"], capsys)[::2])
    finally:
        locked.chmod(0o755)
    assert "cannot write to" in line and "Permission denied" in line


def test_output_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = one_error_line(
        *run_cli(["train", *TINY, "--out", tmp_path / "file" / "run"], capsys)[::2]
    )
    assert "cannot write to" in line


def test_resume_of_a_read_only_run_is_refused(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    write_config(run)
    deny_writes_under(monkeypatch, run)
    no_training(monkeypatch)
    line = one_error_line(*run_cli(["train", "--resume", run], capsys)[::2])
    assert f"cannot write to {run}" in line


# ------------------------------------------------------------------ full disk


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save = torch.save
    calls, before = [], {}

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        before["checkpoint"] = (run / "checkpoint.pt").read_bytes()
        f.write(b"half a checkpoint" * 1000)  # the temp file is partly written, then:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    line = one_error_line(*run_cli(["train", *TINY, "--epochs", "2", "--out", run], capsys)[::2])
    monkeypatch.undo()
    assert f"cannot write {run / 'checkpoint.pt'}: [Errno 28] No space left on device" in line
    assert (
        f"the previous checkpoint (epoch 1, step 2) is kept; continue with --resume {run}" in line
    )
    assert (run / "checkpoint.pt").read_bytes() == before["checkpoint"]  # intact
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert leftovers(run) == []  # no temp file, no lock
    # once there is space again, the run continues
    code, out, err = run_cli(["train", "--resume", run], capsys)
    assert code == 0 and "resuming" in out, err


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_atomic_write_flushes_and_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x" * 100))
    assert events[:2] == ["fsync", "replace"]  # the data, then the name
    assert events[2:] == ["fsync"]  # then the directory entry


def test_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (0600); the result has 0666 minus the umask."""
    from attnzoo.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
