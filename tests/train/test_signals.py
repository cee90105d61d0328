"""SIGINT / SIGTERM during training (attnzoo/train/engine.py, cli.py): stop at the end of the
step with a checkpoint, one line saying how to resume, exit 130 / 143; the resumed run is
bitwise the uninterrupted one."""

from __future__ import annotations

import signal

import pytest
import torch
from run_helpers import TINY, assert_same_run, leftovers, start, wait_for_saves

from attnzoo.cli import main


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_stops_with_a_checkpoint_and_resume_is_exact(
    tiny_reference, tmp_path, capsys, sig, code
):
    run = tmp_path / "run"
    proc = start("train", *TINY, "--out", run)
    assert wait_for_saves(proc, run, 1) == 1  # the training loop is running
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err

    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"attnzoo: stopped by {sig.name} after ")
    assert lines[0].endswith(f"continue with: attnzoo train --resume {run}")
    assert "Traceback" not in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    if state["progress"] is not None:  # stopped inside an epoch: at the step it names
        assert f"after step {state['step']} (epoch {state['epoch'] + 1})" in lines[0]
    else:  # the signal came on an epoch's last step: stopped after that epoch's save
        assert f"after epoch {state['epoch']}," in lines[0]
    assert state["step"] < 24  # stopped early
    assert leftovers(run) == []

    # Resume in this process: it must also match the reference from another process.
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    assert_same_run(run, tiny_reference.result())
    assert leftovers(run) == []
