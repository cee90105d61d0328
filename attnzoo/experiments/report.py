"""Summarise the finished runs of a paper table: ``attnzoo report TABLE``.

Reads ``<out>/<table>/<row-slug>/seed<k>/`` as ``attnzoo reproduce`` writes them and writes
a Markdown table (default ``<out>/<table>/report.md``) with two PNGs beside it:
``<name>-curves.png`` (test accuracy per epoch, mean over seeds, one line per row) and
``<name>-errors.png`` (final top-1 error per row, mean +- std, with the paper's number).

Numbers, per row:
- our error is the *final* epoch's test error of each run (not the best epoch: choosing
  the epoch on the test set would flatter every row), mean +- sample std over seeds; a row
  whose paper number is of another kind says so in its spec (``metric``), and is measured
  alike: ``mean_over_epochs`` is the mean test error over all epochs of each run (seed 002
  reports its SE number so);
- "best of n" is the lowest of those errors over the n seeds: HAM reports the best of 10
  runs, and the column beside the mean shows how much such a selection alone gains;
- "detectable diff" is the smallest true paired difference the seeds would detect with 80%
  power at the 5% level ((t_0.975 + t_0.8) std / sqrt(n), from the paired differences' std),
  and "seeds for 0.3" how many seeds that spread needs for a 0.3-point difference;
- the paper's number is for the dataset the runs used; a paper accuracy becomes
  100 - accuracy;
- the paired comparison takes, for every seed both this row and the table's first row
  (the baseline) finished, the difference of their errors. Same seed means same
  initialisation stream and same batch order, so the differences cancel much of the
  seed-to-seed noise. Mean +- std of the differences; the verdict is "inside the noise"
  when the 95% confidence interval of the mean difference (Student's t with n - 1 degrees
  of freedom: 12.7 standard errors each side for 2 seeds, 4.3 for 3) contains 0.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write, atomic_write_text
from .reproduce import DEFAULT_OUT, PLAN_FILE, read_summary, row_slugs
from .spec import Row, load_table


@dataclass
class RunResult:
    seed: int
    dataset: str
    epochs: int
    top1: float
    top5: float
    params: int
    curve: list[float]  # test accuracy % per epoch
    top5_curve: list[float] = field(default_factory=list)  # top-5 error % per epoch
    train_subset: int | None = None
    test_subset: int | None = None
    model: str | None = None


@dataclass
class RowResult:
    row: Row
    slug: str
    runs: list[RunResult] = field(default_factory=list)
    unfinished: int = 0
    recipe_epochs: int | None = None
    macs: int | None = None

    @property
    def dataset(self) -> str:
        return self.runs[0].dataset if self.runs else self.row.dataset


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def paper_error(paper: dict, which: str, dataset: str) -> float | None:
    """The paper's top-1/top-5 error (%) on ``dataset``, from an error or an accuracy."""
    err = (paper.get(f"{which}_err") or {}).get(dataset)
    if err is not None:
        return float(err)
    acc = (paper.get(f"{which}_acc") or {}).get(dataset)
    return None if acc is None else 100.0 - float(acc)


def paired(baseline: RowResult, result: RowResult) -> dict[str, Any]:
    """Per-seed differences of final top-1 error (row - baseline) and the verdict."""
    base = {r.seed: r.top1 for r in baseline.runs}
    diffs = [r.top1 - base[r.seed] for r in result.runs if r.seed in base]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "verdict": "no common seeds"}
    mean, std = _mean_std(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "std": std, "ci95": None, "verdict": "one seed: no verdict"}
    # A 95% confidence interval of the mean paired difference, with Student's t for n - 1
    # degrees of freedom: with 3 seeds it is 4.3 standard errors wide on each side, not 2.
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    if abs(mean) <= half or mean == 0:
        verdict = "inside the noise"
    else:
        verdict = "lower error than baseline" if mean < 0 else "higher error than baseline"
    verdict += f" (95% CI {mean - half:+.2f} to {mean + half:+.2f})"
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci95": (mean - half, mean + half),
        "verdict": verdict,
        "detectable": detectable_difference(std, n),
        "seeds_needed": seeds_needed(std, TARGET_DIFFERENCE),
    }


# The effect size the report asks about: how many seeds would show a 0.3-point difference.
TARGET_DIFFERENCE = 0.3
POWER = 0.8


def detectable_difference(std: float, n: int, power: float = POWER) -> float:
    """The smallest true paired difference that ``n`` seeds detect (95% two-sided test) with
    probability ``power``, if the paired differences have standard deviation ``std``:
    (t_0.975 + t_power) x std / sqrt(n), Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t as student_t

    df = max(n - 1, 1)
    return (student_t.ppf(0.975, df) + student_t.ppf(power, df)) * std / math.sqrt(n)


def seeds_needed(std: float, difference: float, power: float = POWER, most: int = 10_000) -> int:
    """The fewest seeds whose ``detectable_difference`` is at most ``difference`` (``most``
    if even that many are not enough), taking ``std`` as the paired differences' spread."""
    if std <= 0:
        return 2
    n = 2
    while n < most and detectable_difference(std, n, power) > difference:
        n += 1
    return n


def _finished_run(path: Path) -> RunResult | None:
    from ..train.checkpoint import read_config, read_metrics

    summary = read_summary(path)
    if summary is None or not (path / "config.yaml").is_file():
        return None
    cfg = read_config(path)
    if summary.get("epochs") != cfg.get("epochs"):
        return None
    metrics = read_metrics(path)
    return RunResult(
        seed=int(cfg.get("seed", 0)),
        dataset=str(cfg.get("dataset")),
        epochs=int(summary["epochs"]),
        top1=float(summary["final_top1_err"]),
        top5=float(summary["final_top5_err"]),
        params=int(summary.get("params", 0)),
        curve=[100.0 - float(m["test_top1_err"]) for m in metrics],
        top5_curve=[float(m["test_top5_err"]) for m in metrics],
        train_subset=cfg.get("train_subset"),
        test_subset=cfg.get("test_subset"),
        model=cfg.get("model"),
    )


def apply_metric(run: RunResult, metric: str) -> RunResult:
    """The run's errors as the row's paper number measures them (``spec.METRICS``)."""
    if metric == "mean_over_epochs" and run.curve:
        run.top1 = 100.0 - statistics.fmean(run.curve)
        if run.top5_curve:
            run.top5 = statistics.fmean(run.top5_curve)
    return run


def collect(table_key: str, out: str | Path = DEFAULT_OUT) -> list[RowResult]:
    """Every row of the table with its finished runs (rows without any included)."""
    from ..train import load_recipe

    table = load_table(table_key)
    table_dir = Path(out) / table_key
    plan = {}
    if (table_dir / PLAN_FILE).is_file():
        try:
            plan = json.loads((table_dir / PLAN_FILE).read_text()).get("rows", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            plan = {}
    results = []
    for slug, row in row_slugs(table):
        result = RowResult(row, slug)
        try:
            # The recipe the runs used (reproduce --recipe may replace the row's).
            planned = plan.get(slug, {}) if isinstance(plan, dict) else {}
            result.recipe_epochs = int(
                planned.get("recipe_epochs") or load_recipe(row.recipe)["epochs"]
            )
        except (ValueError, KeyError, TypeError):
            result.recipe_epochs = None
        seed_dirs = [
            p
            for p in (table_dir / slug).glob("seed*")
            if p.is_dir() and re.fullmatch(r"seed\d+", p.name)
        ]
        for path in sorted(seed_dirs, key=lambda p: int(p.name[4:])):
            run = _finished_run(path)
            if run is None:
                result.unfinished += 1
            else:
                result.runs.append(apply_metric(run, row.metric))
        entry = plan.get(slug) or {}
        if entry.get("dataset") == result.dataset:
            result.macs = entry.get("macs")
        results.append(result)
    return results


def _fmt(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:+.2f}" if signed else f"{value:.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def render_markdown(
    table_key: str, results: list[RowResult], out: Path, images: tuple[str, str]
) -> str:
    table = load_table(table_key)
    done = [r for r in results if r.runs]
    show_top5 = any(r.row.paper.get("top5_err") for r in results)
    baseline = results[0]
    head = ["row", "seeds", "dataset", "top-1 err %", "best of n"]
    if show_top5:
        head.append("top-5 err %")
    head += ["epochs (of recipe)", "paper top-1 err %", "diff"]
    if show_top5:
        head += ["paper top-5 err %"]
    head += ["params (M)", "MACs (G)", f"paired diff vs {baseline.row.name}", "verdict"]
    head += ["detectable diff", f"seeds for {TARGET_DIFFERENCE:g}"]
    lines = [
        f"# {table.paper}, {table.table}",
        "",
        f"{table.caption}. Spec: `attnzoo/experiments/{table_key}.yaml`; runs: `{out}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    converted = False
    for r in done:
        top1, std1 = _mean_std([x.top1 for x in r.runs])
        epochs = sorted({x.epochs for x in r.runs})
        used = "/".join(str(e) for e in epochs)
        if r.recipe_epochs:
            used += f" of {r.recipe_epochs} ({100 * max(epochs) / r.recipe_epochs:.3g}%)"
        paper1 = paper_error(r.row.paper, "top1", r.dataset)
        converted |= paper1 is not None and r.dataset not in (r.row.paper.get("top1_err") or {})
        name = r.row.name
        models = sorted({x.model for x in r.runs if x.model and x.model != r.row.model})
        if models:  # reproduce --model: say which network actually ran
            name += f" [run on {'/'.join(models)}]"
        if r.row.metric != "final":
            name += f" ({r.row.metric.replace('_', ' ')})"
        best = min(x.top1 for x in r.runs)
        cells = [name, str(len(r.runs)), r.dataset, _fmt(top1, std1), _fmt(best)]
        if show_top5:
            cells.append(_fmt(*_mean_std([x.top5 for x in r.runs])))
        cells += [used, _fmt(paper1), _fmt(None if paper1 is None else top1 - paper1, signed=True)]
        if show_top5:
            cells.append(_fmt(paper_error(r.row.paper, "top5", r.dataset)))
        params = statistics.fmean(x.params for x in r.runs)
        cells += [f"{params / 1e6:.3f}", "-" if r.macs is None else f"{r.macs / 1e9:.3f}"]
        if r is baseline:
            cells += ["-", "baseline", "-", "-"]
        elif not baseline.runs:
            cells += ["-", "baseline not run", "-", "-"]
        else:
            p = paired(baseline, r)
            diff = "-" if p["mean"] is None else _fmt(p["mean"], p["std"], signed=True)
            cells += [f"{diff} (n={p['n']})", p["verdict"]]
            if p.get("detectable") is None:
                cells += ["-", "-"]
            else:
                cells += [f"{p['detectable']:.2f}", str(p["seeds_needed"])]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [r.row.name for r in results if not r.runs]
    unfinished = sum(r.unfinished for r in results)
    notes = [
        "Errors are the final epoch's test error, mean ± sample std over seeds (a row marked "
        "(mean over epochs): the mean test error over all epochs of each run, as the paper's "
        "number is); `best of n` is the lowest over the n seeds, a selection like the paper's "
        '"best of 10 runs" (HAM), so `top-1 err %` minus `best of n` is what choosing the '
        "best run alone gains. `diff` is our mean minus the paper's, in points. The paired "
        "column is the mean ± std over seeds of "
        f'(row - {baseline.row.name}) for the seeds both finished; the verdict is "inside the '
        "noise\" when the 95% confidence interval of that mean (Student's t, n - 1 degrees of "
        "freedom) contains 0. `detectable diff` is the smallest true difference these seeds "
        f"would detect with {POWER:.0%} power at that 5% level, given the spread of the paired "
        "differences ((t_0.975 + t_0.8) x std / sqrt(n)); `seeds for "
        f"{TARGET_DIFFERENCE:g}` is how many seeds that spread needs to detect a "
        f"{TARGET_DIFFERENCE:g}-point difference. A null verdict with a detectable difference "
        "larger than the effect in question means too few runs, not no effect."
    ]
    if any(r.recipe_epochs and min(x.epochs for x in r.runs) < r.recipe_epochs for r in done):
        notes.append(
            "Runs shorter than their recipe (see the epochs column) are not comparable with "
            "the paper's numbers; compare rows with each other."
        )
    subsets = sorted({x.train_subset for r in done for x in r.runs if x.train_subset})
    if subsets:
        notes.append(
            f"Runs trained on the first {'/'.join(map(str, subsets))} training images only "
            "(`--train-subset`)."
        )
    test_subsets = sorted({x.test_subset for r in done for x in r.runs if x.test_subset})
    if test_subsets:
        notes.append(
            f"Test error on the first {'/'.join(map(str, test_subsets))} test images only "
            "(`--test-subset`)."
        )
    models = sorted({x.model for r in done for x in r.runs if x.model and x.model != r.row.model})
    if models:
        notes.append(
            f"Rows run on {'/'.join(models)} instead of the paper's model (`--model`): the "
            "paper's numbers are for its own model."
        )
    if converted:
        notes.append("The paper gives accuracy for some rows; their error is 100 - accuracy.")
    if missing:
        notes.append(f"Not run yet: {', '.join(missing)}.")
    if unfinished:
        notes.append(
            f"{unfinished} run(s) unfinished (rerun `attnzoo reproduce {table_key}` with the "
            "same options to finish them)."
        )
    for note in notes:
        lines += ["", note]
    lines += ["", f"![test accuracy]({images[0]})", "", f"![top-1 error]({images[1]})", ""]
    return "\n".join(lines)


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def plot_curves(table_key: str, results: list[RowResult], path: Path) -> None:
    """Test accuracy per epoch, mean over each row's seeds."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for r in results:
        curves = [x.curve for x in r.runs if x.curve]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        ax.plot(range(1, length + 1), mean, marker="o" if length < 20 else None, label=r.row.name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy % (mean over seeds)")
    ax.set_title(f"{table_key}: test accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    _save_figure(fig, path)


def plot_errors(table_key: str, results: list[RowResult], path: Path) -> None:
    """Final top-1 error per row, mean ± std over seeds, with the paper's number."""
    from matplotlib.figure import Figure

    done = [r for r in results if r.runs]
    fig = Figure(figsize=(max(6, 1.2 * len(done) + 2), 5))
    ax = fig.add_subplot()
    xs = list(range(len(done)))
    means, stds, paper_x, paper_y = [], [], [], []
    for x, r in enumerate(done):
        mean, std = _mean_std([run.top1 for run in r.runs])
        means.append(mean)
        stds.append(std or 0.0)
        ref = paper_error(r.row.paper, "top1", r.dataset)
        if ref is not None:
            paper_x.append(x)
            paper_y.append(ref)
    ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=5, label="ours (mean ± std)")
    if paper_x:
        ax.plot(paper_x, paper_y, "x", color="tab:red", markersize=9, label="paper")
    ax.set_xlim(-0.5, len(done) - 0.5)
    ax.set_xticks(xs)
    ax.set_xticklabels([r.row.name for r in done], rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("final top-1 error %")
    ax.set_title(f"{table_key}: top-1 error per row")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    _save_figure(fig, path)


def report(
    table_key: str, out: str | Path = DEFAULT_OUT, markdown: str | Path | None = None
) -> list[Path]:
    """Write the Markdown report and its two plots; returns their paths (Markdown first)."""
    results = collect(table_key, out)
    if not any(r.runs for r in results):
        raise ValueError(
            f"no finished runs of {table_key} under {Path(out) / table_key}; run "
            f"`attnzoo reproduce {table_key} --out {out}` first"
        )
    md = Path(markdown) if markdown else Path(out) / table_key / "report.md"
    if md.suffix.lower() != ".md":
        raise ValueError(f"--markdown should name a .md file, got {md}")
    curves = md.with_name(f"{md.stem}-curves.png")
    errors = md.with_name(f"{md.stem}-errors.png")
    plot_curves(table_key, results, curves)
    plot_errors(table_key, results, errors)
    text = render_markdown(table_key, results, Path(out) / table_key, (curves.name, errors.name))
    atomic_write_text(md, text)
    return [md, curves, errors]
