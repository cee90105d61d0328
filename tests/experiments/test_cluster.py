"""``attnzoo reproduce --launcher slurm|local`` (attnzoo/experiments/cluster.py): the same job
objects run through submitit's local executor, a requeue resumes exactly, and the sbatch
script carries the options. No Slurm is needed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("submitit")

from attnzoo.cli import main  # noqa: E402
from attnzoo.experiments.cluster import (  # noqa: E402
    CellJob,
    SlurmOptions,
    sbatch_preview,
    slurm_parameters,
)
from attnzoo.experiments.reproduce import plan_runs, reproduce  # noqa: E402

OPTIONS = dict(epochs=1, seeds=1, train_subset=96, threads=1)


@pytest.fixture
def tiny_table(tiny_table_root):
    return tiny_table_root


def test_local_launcher_runs_the_grid_as_submitit_jobs(tiny_table):
    out = tiny_table / "runs"
    result = reproduce("tiny", out=out, log=lambda m: None, launcher="local", **OPTIONS)
    assert result["counts"]["submitted"] == 2 and result["counts"]["trained"] == 2
    plan = json.loads((out / "tiny" / "plan.json").read_text())
    seeds = [row["seeds"]["0"] for row in plan["rows"].values()]
    assert all(s["status"] == "finished" and s["job"] for s in seeds)
    for slug in ("resnet20", "resnet20-se"):
        assert (out / "tiny" / slug / "seed0" / "summary.json").is_file()
    assert any((out / "tiny" / "slurm").rglob("*_log.out"))  # submitit's logs


def test_a_requeued_cell_resumes_exactly(tiny_table, crash_after_saves, monkeypatch):
    """What a preempted job's requeue runs: the same CellJob, which resumes the checkpoint."""
    out = tiny_table / "runs"
    _, runs = plan_runs("tiny", ["ResNet20"], out=out, **{**OPTIONS, "epochs": 2})
    cfg = runs[0].cfg.to_dict()
    reference = CellJob(cfg, str(tiny_table / "reference"))()
    crash_after_saves(1)  # killed after the first checkpoint (the end of epoch 1 of 2)
    with pytest.raises(KeyboardInterrupt):
        CellJob(cfg, str(runs[0].out))()
    monkeypatch.undo()
    requeued = CellJob(cfg, str(runs[0].out)).checkpoint().function
    summary = requeued()
    assert summary["final_top1_err"] == reference["final_top1_err"]
    weights = (runs[0].out / "model.safetensors").read_bytes()
    assert weights == (tiny_table / "reference" / "model.safetensors").read_bytes()
    assert CellJob(cfg, str(runs[0].out))() == summary  # a finished cell just reports


def test_slurm_parameters_and_sbatch_script(tmp_path):
    options = SlurmOptions(
        partition="gpu", gpus=1, cpus=8, time_min=600, account="lab", mem_gb=32, parallel=4
    )
    params = slurm_parameters(options, "attnzoo-ham_table4")
    assert params["gpus_per_node"] == 1 and params["time"] == 600
    script = sbatch_preview(options, "attnzoo-ham_table4", tmp_path)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=600",
        "#SBATCH --mem=32768M",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=attnzoo-ham_table4",
    ):
        assert line in script, line
    with pytest.raises(ValueError, match="--slurm-time must be at least 1 minute"):
        slurm_parameters(SlurmOptions(time_min=0), "x")


def test_slurm_flags_need_the_launcher(tiny_table, capsys):
    argv = ["reproduce", "tiny", "--slurm-partition", "gpu", "--out", str(tiny_table / "r")]
    assert main(argv) == 2
    assert "--slurm-* options need --launcher slurm" in capsys.readouterr().err
    argv = ["reproduce", "tiny", "--launcher", "local", "--jobs", "2"]
    assert main([*argv, "--out", str(tiny_table / "r")]) == 2
    assert "with --launcher the scheduler runs them" in capsys.readouterr().err
