"""A table's grid on a cluster: ``attnzoo reproduce TABLE --launcher slurm``, through submitit.

Every cell (row x seed) becomes one Slurm job of one job array, submitted with submitit
(``pip install submitit``), from the configuration ``plan_runs`` resolved. A job runs the
cell's ``attnzoo train`` run, or resumes it when its directory holds a checkpoint:

- **Preemption and time limits.** Slurm warns a job before it kills it (submitit asks for
  ``--signal=USR2`` ``signal_delay_s`` seconds ahead); submitit then calls
  ``CellJob.checkpoint``, which requeues the same cell. The requeued job resumes from the
  run's last checkpoint (end of an epoch, or every ``checkpoint_every_steps`` steps, which
  the cluster jobs set to ``SLURM_CHECKPOINT_STEPS`` unless the run sets it), and our resume
  is exact, so a requeue changes nothing in the results, only repeats a few steps.
- **Where things go.** Runs in ``<out>/<table>/...`` as locally (the output root must be on
  a file system the nodes share); submitit's own logs and pickles in ``--slurm-folder``
  (default ``<out>/<table>/slurm``), per job ``%A_%a``.
- ``--launcher local`` runs the same job objects through submitit's LocalExecutor, as local
  processes: what the tests use, since no Slurm is here.

``slurm_parameters`` turns the command-line options into submitit's, and ``sbatch_preview``
renders the sbatch script submitit would submit, so the Slurm side is checked without Slurm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCHERS = ("local", "slurm")
SLURM_CHECKPOINT_STEPS = 200  # a requeue loses at most this many steps of work


def require_submitit():
    try:
        import submitit
    except ImportError as e:
        raise ValueError(
            "--launcher needs submitit: pip install submitit (or pip install 'attnzoo[cluster]')"
        ) from e
    return submitit


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus: int = 0  # per job
    cpus: int | None = None  # per job
    time_min: int = 24 * 60
    account: str | None = None
    mem_gb: float | None = None
    parallel: int | None = None  # most array tasks at once (Slurm's %N)
    folder: str | None = None


def slurm_parameters(options: SlurmOptions, job_name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for one cell per job."""
    for name in ("gpus", "time_min"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"--slurm-{name.replace('_min', '')} must be an int >= 0, got {value!r}"
            )
    if options.time_min < 1:
        raise ValueError(f"--slurm-time must be at least 1 minute, got {options.time_min}")
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": options.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "signal_delay_s": 120,
    }
    if options.partition:
        params["partition"] = options.partition
    if options.account:
        params["account"] = options.account
    if options.gpus:
        params["gpus_per_node"] = options.gpus
    if options.cpus:
        params["cpus_per_task"] = options.cpus
    if options.mem_gb:
        params["mem"] = f"{int(options.mem_gb * 1024)}M"
    if options.parallel:
        params["array_parallelism"] = options.parallel
    return params


def sbatch_preview(options: SlurmOptions, job_name: str, folder: str | Path) -> str:
    """The sbatch script submitit would submit for these options (no Slurm needed)."""
    from submitit.slurm import slurm

    params = slurm_parameters(options, job_name)
    return slurm._make_sbatch_string(
        command="python -u -m submitit.core._submit", folder=str(folder), **params
    )


class CellJob:
    """One cell as a submitit job: train, or resume from the run's checkpoint. Requeued on
    preemption or time-out (``checkpoint``), which resumes exactly."""

    def __init__(self, config: dict, out: str, threads: int | None = None) -> None:
        self.config = config
        self.out = out
        self.threads = threads

    def __call__(self) -> dict:
        from ..train import resume, train
        from ..train.config import TrainConfig
        from .reproduce import read_summary

        out = Path(self.out)
        config = dict(self.config)
        if config.get("checkpoint_every_steps") is None:
            config["checkpoint_every_steps"] = SLURM_CHECKPOINT_STEPS
        if self.threads:
            config["threads"] = self.threads
        cfg = TrainConfig.from_dict(config).validate()
        summary = read_summary(out)
        if summary is not None and summary.get("epochs") == cfg.epochs:
            return summary
        if (out / "checkpoint.pt").is_file():
            return resume(out, threads=cfg.threads)
        return train(cfg, out)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit before Slurm stops the job: requeue this same cell."""
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.config, self.out, self.threads))


def submit_cells(
    cells: list[Any],
    launcher: str,
    folder: Path,
    job_name: str,
    options: SlurmOptions | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Submit every cell (PlannedRun) as one job of an array; returns submitit's jobs."""
    submitit = require_submitit()
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of: {', '.join(LAUNCHERS)}")
    options = options or SlurmOptions()
    folder = Path(folder) / "%A_%a" if launcher == "slurm" else Path(folder) / "%j"
    if launcher == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**slurm_parameters(options, job_name))
    else:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=options.time_min)
    jobs_in = [CellJob(cell.cfg.to_dict(), str(cell.out), threads) for cell in cells]
    with executor.batch():
        jobs = [executor.submit(job) for job in jobs_in]
    return jobs
