"""Paper tables as data: one YAML file per table in this folder.

A table file gives the paper, the table, the settings its rows share, and one entry per
row: how to build it in attnzoo and the numbers the paper reports::

    paper: HAM (Li et al., Pattern Recognition 2022)
    source: 004_8afcb7826256cbc2.txt
    table: Table 4
    caption: Classification results on CIFAR datasets (error %, best of 10 runs)
    defaults: {dataset: cifar10, num_classes: 10, input_size: 32, recipe: ham}
    rows:
      - name: ResNet20 + SE
        model: resnet20
        attention: se
        paper: {params_m: 0.27, gflops: 0.08, memory_mib: 1.03,
                top1_err: {cifar10: 8.31, cifar100: 33.88}}

Row keys: ``name``, ``model``, optional ``attention``, ``attention_kwargs``,
``model_kwargs``, ``note``, and the shared settings (``dataset``, ``num_classes``,
``input_size``, ``recipe``), which a row may override. ``paper`` holds what the paper
prints, in the paper's units: ``params_m`` (millions), ``gflops`` (the paper's own
FLOPs column, whatever it counts), ``memory_mib``, and per-dataset ``top1_err`` /
``top5_err`` / ``top1_acc`` in percent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import NO_ATTENTION, check_attention, list_models
from ..utils.io import read_yaml_mapping

TABLE_DIR = Path(__file__).parent
ROW_KEYS = {
    "name",
    "model",
    "attention",
    "attention_kwargs",
    "model_kwargs",
    "note",
    "paper",
    "dataset",
    "num_classes",
    "input_size",
    "recipe",
}
SHARED_KEYS = {"dataset", "num_classes", "input_size", "recipe"}
PAPER_KEYS = {"params_m", "gflops", "memory_mib", "top1_err", "top5_err", "top1_acc"}


@dataclass(frozen=True)
class Row:
    name: str
    model: str
    attention: str | None
    attention_kwargs: dict
    model_kwargs: dict
    dataset: str
    num_classes: int
    input_size: int
    recipe: str
    paper: dict
    note: str = ""


@dataclass(frozen=True)
class Table:
    key: str
    paper: str
    source: str
    table: str
    caption: str
    rows: list[Row] = field(default_factory=list)


def list_tables() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def _row(key: str, i: int, raw: Any, defaults: dict) -> Row:
    where = f"table {key!r}, row {i + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - ROW_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(ROW_KEYS)}")
    values = {**defaults, **raw}
    missing = sorted({"name", "model", "dataset", "num_classes", "input_size"} - set(values))
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    if values["model"] not in list_models():
        raise ValueError(
            f"{where}: unknown model {values['model']!r}; choose one of: {', '.join(list_models())}"
        )
    attention = values.get("attention")
    attention = None if attention in NO_ATTENTION else attention
    check_attention(attention, values.get("attention_kwargs") or {})
    paper = values.get("paper") or {}
    bad = sorted(set(paper) - PAPER_KEYS)
    if bad:
        raise ValueError(f"{where}: unknown paper key(s) {bad}; valid: {sorted(PAPER_KEYS)}")
    return Row(
        name=str(values["name"]),
        model=values["model"],
        attention=attention,
        attention_kwargs=dict(values.get("attention_kwargs") or {}),
        model_kwargs=dict(values.get("model_kwargs") or {}),
        dataset=values["dataset"],
        num_classes=int(values["num_classes"]),
        input_size=int(values["input_size"]),
        recipe=values.get("recipe", "ham"),
        paper=dict(paper),
        note=str(values.get("note", "")),
    )


def load_table(key: str) -> Table:
    """The table ``key`` (a file name in this folder without .yaml), validated."""
    if key not in list_tables():
        raise ValueError(f"unknown table {key!r}; choose one of: {', '.join(list_tables())}")
    data = read_yaml_mapping(TABLE_DIR / f"{key}.yaml", ValueError, f"table {key!r}")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - (SHARED_KEYS | {"model_kwargs"}):
        raise ValueError(f"table {key!r}: defaults may only set {sorted(SHARED_KEYS)}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"table {key!r}: needs a non-empty list of rows")
    return Table(
        key=key,
        paper=str(data.get("paper", "")),
        source=str(data.get("source", "")),
        table=str(data.get("table", key)),
        caption=str(data.get("caption", "")),
        rows=[_row(key, i, r, defaults) for i, r in enumerate(rows)],
    )
