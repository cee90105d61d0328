"""Several cells of a table's grid at once: ``attnzoo reproduce TABLE --jobs K``.

Each cell (one row x one seed) trains in its own process, started with ``spawn`` (a fresh
interpreter: no state shared with the parent), from the fully resolved TrainConfig that
``plan_runs`` made, so a child never re-reads the table. At most K run at a time, taken in
the plan's seed-major order; on the CPU the cores are divided between them (``threads``
per job, default ``cores // K``, at least 1; threads do not change what a run computes).

- A cell that fails (an exception, a crash, a kill) is reported with its exit status and
  marked ``failed`` in plan.json; the other cells go on. ``run_cells`` returns the failures.
- SIGINT (Ctrl-C, which the terminal sends to every process of the group) or SIGTERM to the
  parent: no new cell starts, the signal is passed on to the running cells, each of which
  stops at its next step with a checkpoint (``train.engine.GracefulStop``), and the parent
  raises ``Interrupted`` once all have exited. Running the same command again resumes them.

Every child prints its log lines prefixed with ``[row-slug seed k]``.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

POLL_SECONDS = 0.2


def default_threads(jobs: int) -> int:
    """Torch threads per job when K jobs share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _cell_main(
    config: dict, out: str, resume_run: bool, threads: int, tag: str, device: str = "auto"
) -> None:
    """One cell, in its own process: train or resume; the exit status says how it ended."""
    from ..train import Interrupted, resume, train
    from ..train.config import TrainConfig

    def log(message: str) -> None:
        print(f"[{tag}] {message}", flush=True)

    try:
        if resume_run:
            resume(out, log=log, threads=threads, device=device)
        else:
            cfg = TrainConfig.from_dict({**config, "threads": threads, "device": device})
            cfg.validate()
            train(cfg, out, log=log)
    except Interrupted as e:
        log(str(e))
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the parent reports every failure alike
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        print(f"[{tag}] error: {reason}", file=sys.stderr, flush=True)
        sys.exit(1)


class _Stop:
    """SIGINT/SIGTERM handler of the parent: records the first signal and passes every one
    to the running cells (a terminal's Ctrl-C reaches them already; a second one is
    ignored by their own handler)."""

    def __init__(self, running: dict) -> None:
        self.signum: int | None = None
        self.running = running
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        for process, _ in self.running.values():
            if process.is_alive() and process.pid:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass


def run_cells(
    cells: list[Any],
    jobs: int,
    threads: int | None,
    on_start: Callable[[Any], None],
    on_end: Callable[[Any, str, int], None],
    log: Callable[[str], None] = print,
    devices: list[str] | None = None,
) -> list[tuple[Any, int]]:
    """Run ``cells`` (PlannedRun, state "train" or "resume") ``jobs`` at a time.

    ``devices``: the device settings the cells train on; each new cell goes to the one with
    the fewest running cells (the first of those), so K jobs over D GPUs put K/D on each.

    ``on_start(cell)`` and ``on_end(cell, status, exit_code)`` (status "finished", "failed"
    or "stopped") let the caller keep plan.json current. Returns the failed cells with their
    exit status; raises ``Interrupted`` after a signal, once every running cell has stopped.
    """
    from ..train import Interrupted

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive int, got {jobs!r}")
    per_job = threads if threads is not None else default_threads(jobs)
    context = mp.get_context("spawn")
    devices = list(devices or ["auto"])
    pending = list(cells)
    running: dict[int, tuple[Any, Any]] = {}
    placed: dict[int, str] = {}  # sentinel -> device of the running cell
    failed: list[tuple[Any, int]] = []
    with _Stop(running) as stop:
        while pending or running:
            while pending and len(running) < jobs and stop.signum is None:
                cell = pending.pop(0)
                tag = f"{cell.slug} seed {cell.seed}"
                load = {d: list(placed.values()).count(d) for d in devices}
                device = min(devices, key=lambda d: load[d])
                process = context.Process(
                    target=_cell_main,
                    args=(
                        cell.cfg.to_dict(),
                        str(cell.out),
                        cell.state == "resume",
                        per_job,
                        tag,
                        device,
                    ),
                    name=f"attnzoo-{tag}",
                )
                on_start(cell)
                action = "resuming" if cell.state == "resume" else "training"
                where = "" if devices == ["auto"] else f" on {device}"
                log(f"[{tag}] {action} -> {cell.out}{where} ({per_job} thread(s))")
                process.start()
                running[process.sentinel] = (process, cell)
                placed[process.sentinel] = device
            if not running:
                break
            multiprocessing.connection.wait(list(running), timeout=POLL_SECONDS)
            for sentinel in [s for s, (p, _) in running.items() if not p.is_alive()]:
                process, cell = running.pop(sentinel)
                placed.pop(sentinel, None)
                process.join()
                code = process.exitcode
                if code == 0:
                    on_end(cell, "finished", code)
                elif stop.signum is not None and code in (
                    128 + signal.SIGINT,
                    128 + signal.SIGTERM,
                ):
                    on_end(cell, "stopped", code)
                else:
                    on_end(cell, "failed", code)
                    failed.append((cell, code))
                    log(
                        f"[{cell.slug} seed {cell.seed}] failed (exit status {code}); "
                        f"the other cells go on"
                    )
            if stop.signum is not None and not running:
                break
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        raise Interrupted(
            stop.signum,
            f"stopped by {name}: every running cell saved a checkpoint, "
            f"{len(pending)} cell(s) not started",
        )
    return failed
