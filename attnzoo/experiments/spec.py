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
``input_size``, ``recipe``), which a row may override; ``defaults`` may hold any row key.
The mappings ``attention_kwargs``, ``model_kwargs`` and ``recipe_overrides`` of a row are
merged into the table's defaults (a row with ``model_kwargs: {placement: final}`` keeps the
table's stem). ``recipe_overrides`` sets training keys of this row on top of its recipe
(``{batch_size: 64}``: the paper trained the row with another batch), and ``metric`` says
what the paper's number is of each run: ``final`` (default, the last epoch's test error)
or ``mean_over_epochs`` (the mean test error over all epochs). ``paper`` holds what the
paper prints, in the paper's units: ``params_m`` (millions), ``gflops`` (the paper's own
FLOPs column, whatever it counts), ``memory_mib``, and per-dataset ``top1_err`` /
``top5_err`` / ``top1_acc`` in percent.

A table may also explain where our parameter counts differ from the paper's
(``benchmarks/params_table.py`` renders these in docs/params.md)::

    params_notes:
      - id: rcca                      # short label, shown beside the rows' diff
        title: RCCA rows              # given once, with the text
        rows: [ResNet20 + RCCA(R=2), ResNet32 + RCCA(R=2)]
        text: >-
          What the paper's numbers fit, ours, and the arithmetic.
      - id: rcca                      # another table's rows under the same note:
        rows: [ResNet56 + RCCA (R=2)] # same id, no title/text (see params_notes())

``rows`` must name rows of the same table. Across all tables every ``id`` has its
``title`` and ``text`` in exactly one entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    "recipe_overrides",
    "metric",
    "dataset_settings",
}
# What a row may change when it runs on another dataset than its own (``dataset_settings``).
DATASET_SETTING_KEYS = {"model", "model_kwargs", "attention_kwargs", "recipe", "recipe_overrides"}
SHARED_KEYS = {"dataset", "num_classes", "input_size", "recipe"}
MERGED_KEYS = ("attention_kwargs", "model_kwargs", "recipe_overrides")  # defaults + row
# What a row's paper number is of each run: the last epoch's test error ("final"), or the
# mean of the test error over all epochs ("mean_over_epochs", seed 002's SE row).
METRICS = ("final", "mean_over_epochs")
PAPER_KEYS = {"params_m", "gflops", "memory_mib", "top1_err", "top5_err", "top1_acc"}
NOTE_KEYS = {"id", "title", "rows", "text", "tolerance_pct"}
# What a paper's "GFLOPs" column counts (``paper_gflops`` of a table): HAM's are 2 x MACs,
# GAM's are MACs. Our count is checked against it; a row further off than FLOPS_TOLERANCE_PCT
# needs a ``flops_notes`` entry that explains it and gives the row's own tolerance.
PAPER_GFLOPS = ("2xMACs", "MACs")
FLOPS_TOLERANCE_PCT = 5.0


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
    recipe_overrides: dict = field(default_factory=dict)
    metric: str = "final"
    dataset_settings: dict = field(default_factory=dict)

    def for_dataset(self, dataset: str) -> Row:
        """This row as it runs on ``dataset``: its ``dataset_settings[dataset]`` applied (the
        paper's ImageNet model and recipe for a row whose own model is a CIFAR network)."""
        settings = self.dataset_settings.get(dataset)
        if not settings:
            return self
        changes = {k: v for k, v in settings.items() if k in ("model", "recipe")}
        for key in ("model_kwargs", "attention_kwargs", "recipe_overrides"):
            if key in settings:
                changes[key] = {**getattr(self, key), **settings[key]}
        return replace(self, **changes)


@dataclass(frozen=True)
class ParamsNote:
    """Why the parameter counts of ``rows`` differ from the paper's (``text`` may live in
    another table's entry with the same ``id``)."""

    id: str
    rows: tuple[str, ...]
    title: str = ""
    text: str = ""
    tolerance_pct: float | None = None  # flops notes: how far the covered rows may be off


@dataclass(frozen=True)
class Table:
    key: str
    paper: str
    source: str
    table: str
    caption: str
    rows: list[Row] = field(default_factory=list)
    params_notes: list[ParamsNote] = field(default_factory=list)
    paper_gflops: str | None = None  # what the paper's GFLOPs column counts (PAPER_GFLOPS)
    flops_notes: list[ParamsNote] = field(default_factory=list)

    def notes_for(self, row_name: str) -> list[str]:
        """The ids of the params notes that cover the row ``row_name``."""
        return [n.id for n in self.params_notes if row_name in n.rows]

    def flops_notes_for(self, row_name: str) -> list[ParamsNote]:
        return [n for n in self.flops_notes if row_name in n.rows]

    def paper_macs(self, row: Row) -> float | None:
        """The paper's FLOPs column of ``row`` converted to MACs (G), or None."""
        gflops = row.paper.get("gflops")
        if gflops is None or self.paper_gflops is None:
            return None
        return float(gflops) / (2 if self.paper_gflops == "2xMACs" else 1)


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
    for name in MERGED_KEYS:  # a row adds to (or changes) the table's mappings
        if isinstance(defaults.get(name), dict) and isinstance(raw.get(name), dict):
            values[name] = {**defaults[name], **raw[name]}
    settings = _dataset_settings(
        where, defaults.get("dataset_settings"), raw.get("dataset_settings")
    )
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
    overrides = values.get("recipe_overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: recipe_overrides must be a mapping, got {overrides!r}")
    from ..train.config import TrainConfig

    fields = {f for f in TrainConfig.__dataclass_fields__}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"{where}: recipe_overrides has unknown key(s) {bad}")
    metric = values.get("metric", "final")
    if metric not in METRICS:
        raise ValueError(f"{where}: unknown metric {metric!r}; choose one of: {METRICS}")
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
        recipe_overrides=dict(overrides),
        metric=metric,
        dataset_settings=settings,
    )


def _dataset_settings(where: str, *layers: Any) -> dict[str, dict]:
    """``dataset_settings`` of the table's defaults, then of the row, merged per dataset."""
    merged: dict[str, dict] = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, dict) or not all(isinstance(v, dict) for v in layer.values()):
            raise ValueError(f"{where}: dataset_settings maps a dataset to settings, got {layer!r}")
        for dataset, settings in layer.items():
            bad = sorted(set(settings) - DATASET_SETTING_KEYS)
            if bad:
                raise ValueError(
                    f"{where}: dataset_settings[{dataset}] has unknown key(s) {bad}; valid: "
                    f"{sorted(DATASET_SETTING_KEYS)}"
                )
            if "model" in settings and settings["model"] not in list_models():
                raise ValueError(
                    f"{where}: dataset_settings[{dataset}]: unknown model {settings['model']!r}"
                )
            merged[dataset] = {**merged.get(dataset, {}), **settings}
    return merged


def _params_notes(
    key: str, raw: Any, row_names: list[str], kind: str = "params_notes"
) -> list[ParamsNote]:
    where = f"table {key!r}, {kind}"
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of notes, got {raw!r}")
    notes = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here}: expected a mapping, got {item!r}")
        unknown = sorted(set(item) - NOTE_KEYS)
        if unknown:
            raise ValueError(f"{here}: unknown key(s) {unknown}; valid: {sorted(NOTE_KEYS)}")
        note_id, rows = item.get("id"), item.get("rows")
        if not isinstance(note_id, str) or not note_id.strip():
            raise ValueError(f"{here}: needs an id (a non-empty string)")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, str) for r in rows):
            raise ValueError(f"{here} ({note_id}): rows must be a non-empty list of row names")
        missing = [r for r in rows if r not in row_names]
        if missing:
            raise ValueError(f"{here} ({note_id}): no such row(s) {missing} in this table")
        title, text = str(item.get("title", "")).strip(), str(item.get("text", "")).strip()
        if bool(title) != bool(text):
            raise ValueError(f"{here} ({note_id}): give both title and text, or neither")
        tolerance = item.get("tolerance_pct")
        if kind == "flops_notes" and not (
            isinstance(tolerance, (int, float))
            and not isinstance(tolerance, bool)
            and tolerance > 0
        ):
            raise ValueError(f"{here} ({note_id}): a flops note needs tolerance_pct > 0")
        notes.append(
            ParamsNote(
                id=note_id,
                rows=tuple(rows),
                title=title,
                text=text,
                tolerance_pct=None if tolerance is None else float(tolerance),
            )
        )
    return notes


def params_notes(
    keys: list[str] | None = None, kind: str = "params_notes"
) -> dict[str, ParamsNote]:
    """Every note id of the tables ``keys`` (default: all) -> the entry that holds its title
    and text, looked up in all tables. Raises if an id has no text or two. ``kind``:
    ``params_notes`` or ``flops_notes``."""
    defining: dict[str, ParamsNote] = {}
    for key in list_tables():
        for note in getattr(load_table(key), kind):
            if note.text:
                if note.id in defining:
                    raise ValueError(f"params note {note.id!r} has its text twice (table {key!r})")
                defining[note.id] = note
    wanted = [n.id for k in (keys or list_tables()) for n in getattr(load_table(k), kind)]
    missing = sorted({i for i in wanted if i not in defining})
    if missing:
        raise ValueError(f"params note(s) {missing} have no title and text in any table")
    return {i: defining[i] for i in dict.fromkeys(wanted)}


def load_table(key: str) -> Table:
    """The table ``key`` (a file name in this folder without .yaml), validated."""
    if key not in list_tables():
        raise ValueError(f"unknown table {key!r}; choose one of: {', '.join(list_tables())}")
    data = read_yaml_mapping(TABLE_DIR / f"{key}.yaml", ValueError, f"table {key!r}")
    defaults = data.get("defaults") or {}
    allowed = SHARED_KEYS | {"model_kwargs", "attention_kwargs", "recipe_overrides"}
    allowed |= {"dataset_settings", "metric"}
    if not isinstance(defaults, dict) or set(defaults) - allowed:
        raise ValueError(f"table {key!r}: defaults may only set {sorted(allowed)}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"table {key!r}: needs a non-empty list of rows")
    table_rows = [_row(key, i, r, defaults) for i, r in enumerate(rows)]
    return Table(
        key=key,
        paper=str(data.get("paper", "")),
        source=str(data.get("source", "")),
        table=str(data.get("table", key)),
        caption=str(data.get("caption", "")),
        rows=table_rows,
        params_notes=_params_notes(key, data.get("params_notes"), [r.name for r in table_rows]),
        paper_gflops=_paper_gflops(key, data.get("paper_gflops"), table_rows),
        flops_notes=_params_notes(
            key, data.get("flops_notes"), [r.name for r in table_rows], "flops_notes"
        ),
    )


def _paper_gflops(key: str, value: Any, rows: list[Row]) -> str | None:
    if value is None:
        if any("gflops" in r.paper for r in rows):
            raise ValueError(
                f"table {key!r}: rows give paper GFLOPs, so paper_gflops must say what they "
                f"count: one of {PAPER_GFLOPS}"
            )
        return None
    if value not in PAPER_GFLOPS:
        raise ValueError(
            f"table {key!r}: paper_gflops must be one of {PAPER_GFLOPS}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class ModuleParamsRow:
    """A zoo module's published parameter count (and MACs) for one network
    (``zoo/module_params.yaml``)."""

    name: str
    model: str
    attention: str
    attention_kwargs: dict
    model_kwargs: dict
    num_classes: int
    input_size: int
    paper_params_m: float
    paper_gmacs: float | None
    source: str
    note: str = ""


MODULE_PARAMS_KEYS = set(ModuleParamsRow.__dataclass_fields__)


def load_module_params() -> list[ModuleParamsRow]:
    """The rows of ``zoo/module_params.yaml``: what the zoo modules' own papers publish."""
    path = TABLE_DIR / "zoo" / "module_params.yaml"
    rows = read_yaml_mapping(path, ValueError, "the module parameter list").get("rows") or []
    out = []
    for i, raw in enumerate(rows):
        bad = sorted(set(raw) - MODULE_PARAMS_KEYS)
        if bad:
            raise ValueError(f"{path.name}, row {i + 1}: unknown key(s) {bad}")
        check_attention(raw["attention"], raw.get("attention_kwargs"))
        out.append(
            ModuleParamsRow(
                name=raw["name"],
                model=raw["model"],
                attention=raw["attention"],
                attention_kwargs=dict(raw.get("attention_kwargs") or {}),
                model_kwargs=dict(raw.get("model_kwargs") or {}),
                num_classes=int(raw.get("num_classes", 1000)),
                input_size=int(raw.get("input_size", 224)),
                paper_params_m=float(raw["paper_params_m"]),
                paper_gmacs=raw.get("paper_gmacs"),
                source=str(raw["source"]),
                note=str(raw.get("note", "")),
            )
        )
    return out
