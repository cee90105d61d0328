"""``attnzoo reproduce --jobs K`` (attnzoo/experiments/parallel.py): cells in K processes give
the same runs as one after another; a failed cell is reported while the others finish;
Ctrl-C stops every cell at a checkpoint and the same command finishes them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from attnzoo.experiments.parallel import default_threads
from attnzoo.experiments.reproduce import plan_runs, reproduce
from attnzoo.train import RunError

OPTIONS = dict(epochs=1, seeds=2, train_subset=96, threads=1)
CELLS = ["resnet20/seed0", "resnet20/seed1", "resnet20-se/seed0", "resnet20-se/seed1"]


@pytest.fixture
def tiny_table(tiny_table_root):
    return tiny_table_root


def statuses(out) -> dict[str, str]:
    plan = json.loads((out / "tiny" / "plan.json").read_text())
    return {
        f"{slug}/seed{seed}": entry["status"]
        for slug, row in plan["rows"].items()
        for seed, entry in row["seeds"].items()
    }


def test_default_threads_divide_the_cores():
    cores = os.cpu_count() or 1
    assert default_threads(1) == cores and default_threads(10**6) == 1


def test_the_plan_is_seed_major(tiny_table):
    # Every row at seed 0 before any row at seed 1: a grid cut short keeps the rows level.
    _, runs = plan_runs("tiny", out=tiny_table / "plan", **OPTIONS)
    assert [f"{r.slug}/seed{r.seed}" for r in runs] == [
        "resnet20/seed0", "resnet20-se/seed0", "resnet20/seed1", "resnet20-se/seed1",
    ]  # fmt: skip


def test_two_jobs_give_the_runs_one_job_gives(tiny_table):
    one, two = tiny_table / "one", tiny_table / "two"
    sequential = reproduce("tiny", out=one, log=lambda m: None, **OPTIONS)
    lines: list[str] = []
    parallel = reproduce("tiny", out=two, log=lines.append, jobs=2, **OPTIONS)
    assert sequential["counts"] == parallel["counts"] == {
        "trained": 4, "resumed": 0, "finished_before": 0,
    }  # fmt: skip
    assert set(statuses(two).values()) == {"finished"}
    for cell in CELLS:  # same seed, same threads: bitwise the same weights
        a = (one / "tiny" / cell / "model.safetensors").read_bytes()
        b = (two / "tiny" / cell / "model.safetensors").read_bytes()
        assert a == b, cell
    assert any(line.startswith("[resnet20-se seed 1] training ->") for line in lines)
    again = reproduce("tiny", out=two, log=lambda m: None, jobs=2, **OPTIONS)
    assert again["counts"]["finished_before"] == 4


def test_a_failed_cell_is_reported_and_the_others_finish(tiny_table):
    out = tiny_table / "runs"
    # One cell holds a matching run with a corrupt checkpoint: it resumes, and fails.
    _, runs = plan_runs("tiny", ["ResNet20"], out=out, **{**OPTIONS, "seeds": 1})
    broken = runs[0].out
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text(yaml.safe_dump(runs[0].cfg.to_dict()))
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match=r"1 of 4 cells failed: ResNet20 seed 0 \(exit 1\)"):
        reproduce("tiny", out=out, log=lambda m: None, jobs=2, **OPTIONS)
    assert statuses(out) == {
        "resnet20/seed0": "failed",
        "resnet20/seed1": "finished",
        "resnet20-se/seed0": "finished",
        "resnet20-se/seed1": "finished",
    }


def test_jobs_must_be_positive(tiny_table):
    with pytest.raises(ValueError, match="--jobs must be a positive int, got 0"):
        reproduce("tiny", out=tiny_table / "r", log=lambda m: None, jobs=0, **OPTIONS)


@pytest.mark.slow
def test_ctrl_c_stops_every_cell_at_a_checkpoint_and_the_command_finishes_them(tiny_table):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: exit 130, every started
    cell stopped with a checkpoint; the same command then resumes and finishes them."""
    out = tiny_table / "runs"
    table_dir = tiny_table / "tables"
    script = (
        "import sys; from attnzoo.experiments import spec; from pathlib import Path; "
        f"spec.TABLE_DIR = Path({str(table_dir)!r}); from attnzoo.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = [
        sys.executable, "-c", script, "reproduce", "tiny", "--epochs", "3", "--seeds", "2",
        "--train-subset", "256", "--threads", "1", "--jobs", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    # Wait until both first cells have written a checkpoint (an epoch is done).
    while time.monotonic() < deadline:
        done = [c for c in CELLS[:3] if (out / "tiny" / c / "checkpoint.pt").exists()]
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and "run the same reproduce command again" in stderr
    assert "stopped" in statuses(out).values()
    assert "running" not in statuses(out).values()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert set(statuses(out).values()) == {"finished"}


def test_devices_spread_the_running_cells(tiny_table):
    # Two jobs over two (CPU) devices: each cell is placed on the least loaded one and trains
    # there; the configs record the device given.
    out = tiny_table / "devices"
    lines: list[str] = []
    reproduce("tiny", out=out, log=lines.append, jobs=2, devices="cpu,cpu",
              **{**OPTIONS, "seeds": 1})  # fmt: skip
    started = [line for line in lines if "] training ->" in line]
    assert len(started) == 2 and all(line.split(" (")[0].endswith(" on cpu") for line in started)
    for cell in ("resnet20/seed0", "resnet20-se/seed0"):
        config = yaml.safe_load((out / "tiny" / cell / "config.yaml").read_text())
        assert config["device"] == "cpu"


def test_several_devices_need_several_jobs(tiny_table):
    with pytest.raises(ValueError, match="add --jobs 2"):
        reproduce("tiny", out=tiny_table / "x", log=lambda m: None, devices="cuda:0,cuda:1",
                  **OPTIONS)  # fmt: skip
