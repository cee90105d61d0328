"""Train the rows of a paper table, several seeds each: ``attnzoo reproduce TABLE``.

Every selected row x seed is one ordinary training run (``attnzoo.train.train``), run one
after another, in::

    <out>/<table>/plan.json                  what was asked for and what each run did
    <out>/<table>/<row-slug>/seed<k>/        a run directory (config.yaml, metrics.jsonl, ...)

The command can be stopped at any point and started again with the same arguments: a run
whose summary.json says it finished its planned epochs is skipped, a run with a
checkpoint.pt is resumed (``attnzoo.train.resume``), any other is started. A run directory
that holds a run with other settings (another budget, dataset, ...) is an error, never
overwritten.

``budget`` scales each recipe's epochs (0.05 of 200 = 10; at least 1). The recipe's
milestones are fractions of the run, so a shortened run keeps the schedule's shape.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_json
from .spec import Row, Table, load_table

DEFAULT_OUT = "runs/reproduce"
PLAN_FILE = "plan.json"
# Settings that do not change what a run computes: a restart may change them freely.
# Settings that change speed, not results: a run started with other values is the same run.
NOT_COMPARED = {
    "data_dir", "threads", "progress", "checkpoint_every_steps", "compile", "workers",
    "device", "deterministic",
}  # fmt: skip


@dataclass
class PlannedRun:
    row: Row
    slug: str
    seed: int
    cfg: Any  # TrainConfig
    out: Path
    state: str  # "done" (skip), "resume" or "train"
    recipe_epochs: int = 0  # the full run's epochs: the recipe's, or the row's own


def slugify(name: str) -> str:
    """A row name as a directory name: ``"ResNet56 + HAM (lambda=0.8)"`` -> ``resnet56-ham-lambda-0-8``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "row"


def row_slugs(table: Table) -> list[tuple[str, Row]]:
    """(slug, row) for every row of ``table``, in order; a clashing slug gets ``-2``, ``-3``..."""
    seen: set[str] = set()
    out = []
    for row in table.rows:
        base = slug = slugify(row.name)
        n = 1
        while slug in seen:
            n += 1
            slug = f"{base}-{n}"
        seen.add(slug)
        out.append((slug, row))
    return out


def select_rows(table: Table, wanted: list[str] | None) -> list[tuple[str, Row]]:
    """The rows named in ``wanted`` (by slug, name or 1-based number), or all of them."""
    rows = row_slugs(table)
    if not wanted:
        return rows
    chosen: list[tuple[str, Row]] = []
    for w in wanted:
        key = str(w).strip()
        match = [
            (slug, row)
            for i, (slug, row) in enumerate(rows, 1)
            if key in (slug, str(i)) or key.casefold() == row.name.casefold()
        ]
        if not match:
            raise ValueError(
                f"unknown row {w!r} in table {table.key!r}; give a slug, a name or a number "
                f"1-{len(rows)}: {', '.join(slug for slug, _ in rows)}"
            )
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def check_budget(budget: float | None, epochs: int | None) -> None:
    if budget is not None and epochs is not None:
        raise ValueError("give --epochs or --budget, not both")
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or not 0 < budget <= 1
    ):
        raise ValueError(
            f"--budget must be a fraction of the recipe's epochs in (0, 1], got {budget!r}; "
            f"for a fixed number of epochs use --epochs"
        )
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ValueError(f"--epochs must be a positive int, got {epochs!r}")


RUN_LENGTH_KEYS = ("epochs", "warmup_epochs")  # set per run from the budget, below


def planned_epochs(
    recipe_epochs: int, epochs: int | None = None, budget: float | None = None
) -> int:
    """``epochs`` if given, else ``budget`` x the recipe's epochs rounded (at least 1)."""
    if epochs is not None:
        return epochs
    if budget is None:
        return recipe_epochs
    return max(1, math.floor(budget * recipe_epochs + 0.5))


def run_dir(out: str | Path, table: str, slug: str, seed: int) -> Path:
    return Path(out) / table / slug / f"seed{seed}"


def read_summary(run: Path) -> dict | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}; delete it to let the run finish again") from e
    return value if isinstance(value, dict) else None


def _config_differences(run: Path, cfg) -> list[str]:
    from ..train.checkpoint import read_config

    existing = read_config(run)
    planned = cfg.to_dict()
    keys = sorted((set(existing) & set(planned)) - NOT_COMPARED)
    return [f"{k} {existing[k]!r} (now {planned[k]!r})" for k in keys if existing[k] != planned[k]]


def run_state(run: Path, cfg) -> str:
    """The state of run directory ``run`` planned as ``cfg``: "done", "resume" or "train"."""
    summary = read_summary(run)
    has_checkpoint = (run / "checkpoint.pt").is_file()
    if summary is not None or has_checkpoint:
        diff = _config_differences(run, cfg)
        if diff:
            raise ValueError(
                f"{run} holds a run with other settings: {'; '.join(diff)}; use another --out "
                f"or remove that directory"
            )
    if summary is not None and summary.get("epochs") == cfg.epochs:
        return "done"
    return "resume" if has_checkpoint else "train"


def plan_runs(
    table_key: str,
    rows: list[str] | None = None,
    *,
    epochs: int | None = None,
    budget: float | None = None,
    seeds: int = 1,
    dataset: str | None = None,
    data_dir: str | None = None,
    out: str | Path = DEFAULT_OUT,
    train_subset: int | None = None,
    test_subset: int | None = None,
    model: str | None = None,
    recipe: str | None = None,
    threads: int | None = None,
) -> tuple[Table, list[PlannedRun]]:
    """Check everything and decide what each run needs, before any training."""
    from ..data.datasets import list_datasets
    from ..registry import default_num_classes
    from ..train import load_recipe, resolve_config

    table = load_table(table_key)
    check_budget(budget, epochs)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a positive int, got {seeds!r}")
    if not str(out).strip():
        raise ValueError("--out is empty; give an output directory")
    selected = select_rows(table, rows)
    if dataset is not None and dataset not in list_datasets():
        raise ValueError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(list_datasets())}"
        )
    # Seed-major order (every row at seed 0, then every row at seed 1, ...): a grid cut short
    # leaves every row with the same number of seeds.
    cells = []
    for slug, row in selected:
        name = dataset or row.dataset
        row = row.for_dataset(name)  # the row's own model/recipe for that dataset, if any
        if name == "imagenet" and not model and default_num_classes(row.model) != 1000:
            raise ValueError(
                f"row {row.name!r} of {table_key} has no ImageNet model: {row.model} is a "
                f"network for 32x32 images and the spec's dataset_settings name none for "
                f"imagenet; choose one with --model (e.g. resnet50)"
            )
        if name not in list_datasets():
            raise ValueError(
                f"row {row.name!r} of {table_key} is on dataset {name!r}, which is not "
                f"available; run it on another with --dataset, one of: "
                f"{', '.join(list_datasets())}"
            )
        recipe_name = recipe or row.recipe
        # The row's own training settings (the paper's batch for it, say) apply on top of
        # whichever recipe runs it.
        row_settings = dict(row.recipe_overrides)
        recipe_cfg = {**load_recipe(recipe_name), **row_settings}
        recipe_epochs = int(recipe_cfg["epochs"])
        run_epochs = planned_epochs(recipe_epochs, epochs, budget)
        # A shortened run keeps the recipe's shape: milestones are fractions already, and
        # the warmup shrinks by the same factor.
        warmup = recipe_cfg.get("warmup_epochs") or 0
        if run_epochs != recipe_epochs:
            warmup = warmup * run_epochs / recipe_epochs
        elif "warmup_epochs" not in row_settings:
            warmup = None  # the recipe's own
        cells.append(
            (slug, row, recipe_name, row_settings, run_epochs, warmup, name, recipe_epochs)
        )
    runs = []
    for seed in range(seeds):
        for slug, row, recipe_name, row_settings, run_epochs, warmup, name, recipe_epochs in cells:
            settings = {k: v for k, v in row_settings.items() if k not in RUN_LENGTH_KEYS}
            cfg = resolve_config(
                recipe_name,
                **settings,
                model=model or row.model,
                attention=row.attention,
                attention_kwargs=dict(row.attention_kwargs),
                model_kwargs=dict(row.model_kwargs),
                dataset=name,
                data_dir=data_dir,
                epochs=run_epochs,
                warmup_epochs=warmup,
                seed=seed,
                train_subset=train_subset,
                test_subset=test_subset,
                threads=threads,
            )
            path = run_dir(out, table_key, slug, seed)
            runs.append(PlannedRun(row, slug, seed, cfg, path, run_state(path, cfg), recipe_epochs))
    return table, runs


def _read_plan(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _dataset_shape(name: str, data_dir: str | None, cache: dict) -> tuple[int, int]:
    """(classes, image side) of a dataset, loaded once per invocation."""
    if name not in cache:
        from ..data import load_dataset

        data = load_dataset(name, data_dir)
        cache[name] = (data.num_classes, int(data.image_size[0]))
    return cache[name]


def _model_cost(cfg, num_classes: int, size: int) -> tuple[int | None, int | None]:
    """Parameters, and MACs of one forward pass on one image (None if they cannot be counted)."""
    import torch

    from ..measure import count_flops, count_params
    from ..registry import create_model

    # A bad model option fails here, before any training.
    model = create_model(
        cfg.model,
        num_classes=num_classes,
        attention=cfg.attention,
        attention_kwargs=cfg.attention_kwargs,
        **cfg.model_kwargs,
    )
    try:
        macs = count_flops(model, torch.randn(1, 3, size, size)) // 2
    except Exception:  # a count is a nicety of the report, never a reason to stop training
        macs = None
    return count_params(model), macs


def reproduce(
    table_key: str,
    rows: list[str] | None = None,
    *,
    epochs: int | None = None,
    budget: float | None = None,
    seeds: int = 1,
    dataset: str | None = None,
    data_dir: str | None = None,
    out: str | Path = DEFAULT_OUT,
    train_subset: int | None = None,
    test_subset: int | None = None,
    model: str | None = None,
    recipe: str | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    launcher: str | None = None,
    slurm: Any = None,
    devices: str | list[str] | None = None,
) -> dict[str, Any]:
    """Run (or finish) every selected row x seed of ``table_key``; returns the plan written.

    The returned dict is plan.json's content plus ``counts``: how many runs were trained,
    resumed, or skipped because they had finished. ``jobs`` > 1 runs that many cells at a
    time, each in its own process (``parallel.py``); a failed cell does not stop the
    others, and ``RunError`` names the failures at the end. ``launcher`` "slurm" submits
    every cell as a job of one Slurm array and returns (``cluster.py``; ``slurm`` holds the
    ``SlurmOptions``); "local" runs the same jobs through submitit's local executor and
    waits for them. ``devices`` (``--devices``): one device setting for every cell, or a list
    that the running cells are spread over (each new cell goes to the device with the fewest
    running; e.g. ``cuda:0,cuda:1`` with ``jobs=4`` runs two cells per GPU).
    """
    from ..train import load_recipe, resume, train

    device_list = parse_devices(devices)
    if len(device_list) > 1 and jobs == 1 and launcher is None:
        raise ValueError(
            f"--devices {','.join(device_list)} lists {len(device_list)} devices for one job at a "
            f"time; add --jobs {len(device_list)} (or more) to use them all"
        )

    table, runs = plan_runs(
        table_key,
        rows,
        epochs=epochs,
        budget=budget,
        seeds=seeds,
        dataset=dataset,
        data_dir=data_dir,
        out=out,
        train_subset=train_subset,
        test_subset=test_subset,
        model=model,
        recipe=recipe,
        threads=threads,
    )
    table_dir = Path(out) / table_key
    plan_path = table_dir / PLAN_FILE
    plan = _read_plan(plan_path)
    plan.update(
        table=table_key,
        paper=table.paper,
        source=table.source,
        title=table.table,
        caption=table.caption,
        request={
            "rows": [slug for slug, _ in select_rows(table, rows)],
            "seeds": seeds,
            "epochs": epochs,
            "budget": budget,
            "dataset": dataset,
            "train_subset": train_subset,
            "test_subset": test_subset,
            "model": model,
            "recipe": recipe,
        },
    )
    plan_rows = plan.setdefault("rows", {})
    shapes: dict = {}
    for run in runs:
        entry = plan_rows.get(run.slug)
        recipe_epochs = run.recipe_epochs or int(load_recipe(run.cfg.recipe)["epochs"])
        fresh = {
            "name": run.row.name,
            "model": run.cfg.model,
            "attention": run.cfg.attention,
            "attention_kwargs": run.cfg.attention_kwargs,
            "model_kwargs": run.cfg.model_kwargs,
            "dataset": run.cfg.dataset,
            "recipe": run.cfg.recipe,
            "recipe_epochs": recipe_epochs,
            "epochs": run.cfg.epochs,
            "budget": run.cfg.epochs / recipe_epochs,
            "train_subset": run.cfg.train_subset,
            "test_subset": run.cfg.test_subset,
        }
        if entry is None or any(entry.get(k) != v for k, v in fresh.items()):
            seeds_before = (entry or {}).get("seeds", {})
            entry = plan_rows[run.slug] = {**fresh, "seeds": seeds_before}
        if "macs" not in entry or run.state != "done":
            # Loads the data (once per dataset) and builds the model, so that a missing
            # dataset or a bad model option fails here, before any training.
            num_classes, size = _dataset_shape(run.cfg.dataset, data_dir, shapes)
            if "macs" not in entry:
                params, macs = _model_cost(run.cfg, num_classes, size)
                entry.update(num_classes=num_classes, input_size=size, params=params, macs=macs)
        entry["seeds"][str(run.seed)] = {
            "dir": str(run.out.relative_to(table_dir)),
            "status": "finished" if run.state == "done" else "pending",
        }

    def save() -> None:
        plan["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(plan_path, plan)

    save()
    counts = {"trained": 0, "resumed": 0, "finished_before": 0}
    todo = [r for r in runs if r.state != "done"]
    counts["finished_before"] = len(runs) - len(todo)
    log(
        f"{table_key}: {len(runs)} runs ({len(runs) - len(todo)} finished before, "
        f"{len(todo)} to do) -> {table_dir}"
    )
    if launcher is not None:
        return _reproduce_submitit(
            table_key, todo, launcher, slurm, threads, table_dir, plan, plan_rows, save, counts, log
        )
    if jobs != 1:
        return _reproduce_parallel(
            todo, jobs, threads, plan, plan_rows, save, counts, log, device_list
        )
    device = device_list[0]
    for i, run in enumerate(todo, 1):
        status = plan_rows[run.slug]["seeds"][str(run.seed)]
        action = "resuming" if run.state == "resume" else "training"
        log(f"[{i}/{len(todo)}] {run.row.name}, seed {run.seed}: {action} -> {run.out}")
        status["status"] = "running"
        save()
        try:
            if run.state == "resume":
                resume(run.out, log=log, device=device)
                counts["resumed"] += 1
            else:
                run.cfg.device = device
                train(run.cfg, run.out, log=log)
                counts["trained"] += 1
        except BaseException:
            status["status"] = "stopped"
            save()
            raise
        status["status"] = "finished"
        save()
    return {**plan, "counts": counts}


def parse_devices(devices: str | list[str] | None) -> list[str]:
    """``--devices``: None (auto), one setting, or a comma-separated list of them."""
    from ..train.fastpath import check_device

    if devices is None:
        return ["auto"]
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    items = [d.strip() for d in items]
    if not items or any(not d for d in items):
        raise ValueError(f"--devices {devices!r} has an empty item; e.g. cuda:0,cuda:1 or cpu")
    for d in items:
        try:
            check_device(d)
        except ValueError as e:
            raise ValueError(f"--devices: {e}") from e
    return items


def _reproduce_parallel(
    todo, jobs, threads, plan, plan_rows, save, counts, log, devices=("auto",)
) -> dict:
    """The cells of ``todo`` in ``jobs`` processes (parallel.py), plan.json kept current."""
    from ..train import RunError
    from .parallel import run_cells

    def status(run: PlannedRun) -> dict:
        return plan_rows[run.slug]["seeds"][str(run.seed)]

    def on_start(run: PlannedRun) -> None:
        status(run)["status"] = "running"
        save()

    def on_end(run: PlannedRun, outcome: str, code: int) -> None:
        status(run)["status"] = outcome
        if outcome == "finished":
            counts["resumed" if run.state == "resume" else "trained"] += 1
        save()

    failed = run_cells(todo, jobs, threads, on_start, on_end, log=log, devices=list(devices))
    if failed:
        names = ", ".join(f"{run.row.name} seed {run.seed} (exit {code})" for run, code in failed)
        raise RunError(
            f"{len(failed)} of {len(todo)} cells failed: {names}; the others finished. Their "
            f"logs are above; run the same command again to retry them"
        )
    return {**plan, "counts": counts}


def _reproduce_submitit(
    table_key, todo, launcher, slurm, threads, table_dir, plan, plan_rows, save, counts, log
) -> dict:
    """Submit the cells through submitit (cluster.py): Slurm returns at once, local waits."""
    from ..train import RunError
    from .cluster import SlurmOptions, submit_cells

    options = slurm or SlurmOptions()
    folder = Path(options.folder) if options.folder else table_dir / "slurm"
    jobs = submit_cells(todo, launcher, folder, f"attnzoo-{table_key}", options, threads)
    for run, job in zip(todo, jobs, strict=True):
        entry = plan_rows[run.slug]["seeds"][str(run.seed)]
        entry.update(status="submitted", job=str(job.job_id))
    save()
    log(f"submitted {len(jobs)} job(s) with {launcher}: {', '.join(str(j.job_id) for j in jobs)}")
    counts["submitted"] = len(jobs)
    if launcher == "slurm":
        return {**plan, "counts": counts}
    failed = []
    for run, job in zip(todo, jobs, strict=True):
        entry = plan_rows[run.slug]["seeds"][str(run.seed)]
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - submitit wraps the job's failure
            entry["status"] = "failed"
            failed.append(f"{run.row.name} seed {run.seed} ({' '.join(str(e).split())[-200:]})")
        else:
            entry["status"] = "finished"
            counts["resumed" if run.state == "resume" else "trained"] += 1
        save()
    if failed:
        raise RunError(f"{len(failed)} of {len(jobs)} jobs failed: {'; '.join(failed)}")
    return {**plan, "counts": counts}
