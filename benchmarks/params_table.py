"""Parameters and MACs of every row of the papers' tables, beside the papers' numbers.

    python benchmarks/params_table.py > docs/params.md
    python benchmarks/params_table.py ham_table4 gam_table1     # some tables only
    python benchmarks/params_table.py --no-macs                 # parameters only, fast

The last sections, "Differences over 0.5%, explained" and "FLOPs differences over 5%,
explained", render the ``params_notes`` and ``flops_notes`` of the specs (see
attnzoo/experiments/spec.py): for each note, its rows (paper, ours, diff) and the text; a
flagged row that no note covers is listed as not explained yet. Each note's id is shown
beside its rows' diff in the tables. The FLOPs comparison converts the paper's column to
MACs by the table's ``paper_gflops`` (HAM: 2 x MACs, GAM: MACs);
tests/experiments/test_fidelity.py fails when a row drifts past its tolerance.

Each row is built exactly as its spec in attnzoo/experiments/<table>.yaml says (model,
attention, options, classes, input size) and counted with attnzoo.measure: parameters,
and MACs of one forward pass on one image (torch.utils.flop_counter on the meta device:
shapes only, so the whole set takes seconds; FLOPs = 2 x MACs).
The papers' "FLOPs"/"GFLOPs" columns are printed as given: HAM's are 2 x MACs, GAM's
are MACs (the conventions differ between papers; see docs/params.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from attnzoo import create_model
from attnzoo.experiments import list_tables, load_table
from attnzoo.experiments.spec import load_module_params, params_notes
from attnzoo.measure import count_flops, count_params
from attnzoo.registry import attention_level, default_placement, list_attentions

DIFF_NOTE = 0.5  # percent: differences above this are flagged for explanation


FLOPS_NOTE = 5.0  # percent: FLOPs differences above this need a flops note


def row_counts(row, macs: bool = True) -> tuple[int, int | None]:
    with torch.device("meta"):  # parameters and FLOPs from shapes alone
        model = create_model(
            row.model,
            num_classes=row.num_classes,
            attention=row.attention,
            attention_kwargs=row.attention_kwargs,
            **row.model_kwargs,
        )
        x = torch.empty(1, 3, row.input_size, row.input_size)
    if not macs:
        return count_params(model), None
    return count_params(model), count_flops(model, x) // 2


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def compare(params: int, pm: float | None) -> tuple[str, bool]:
    """The diff cell (without note ids) and whether it is flagged (``**``)."""
    if not pm:
        return "-", False
    d = 100 * (params / 1e6 - pm) / pm
    ours = params / 1e6
    # The papers print two decimals, truncated (HAM) or rounded: either counts.
    same = abs(math.floor(ours * 100 + 1e-9) / 100 - pm) < 1e-9 or abs(round(ours, 2) - pm) < 1e-9
    flagged = not same and abs(d) > DIFF_NOTE
    return f"{d:+.2f}%" + (" (=)" if same else " **" if flagged else ""), flagged


def table_markdown(key: str, macs: bool = True) -> tuple[str, list[dict]]:
    """The table's markdown, and one record per row (for the explained-differences section)."""
    table = load_table(key)
    lines = [
        f"## {table.paper}, {table.table}",
        "",
        f"{table.caption}. Spec: `attnzoo/experiments/{key}.yaml`.",
        "",
        "| row | model, options | params (M) | paper (M) | diff | MACs (G) | 2 x MACs (G) | paper GFLOPs | paper as MACs (G) | MACs diff | param MiB | paper Memory(M) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    records = []
    for row in table.rows:
        params, n_macs = row_counts(row, macs)
        paper = row.paper
        pm = paper.get("params_m")
        diff, flagged = compare(params, pm)
        ids = table.notes_for(row.name)
        paper_macs = table.paper_macs(row)
        macs_diff, macs_flagged = "-", False
        if paper_macs and n_macs is not None:
            d = 100 * (n_macs / 1e9 - paper_macs) / paper_macs
            macs_flagged = abs(d) > FLOPS_NOTE
            macs_diff = f"{d:+.1f}%" + (" **" if macs_flagged else "")
        flops_ids = [n.id for n in table.flops_notes_for(row.name)]
        records.append(
            {
                "table": table,
                "row": row,
                "params": params,
                "diff": diff,
                "flagged": flagged,
                "notes": ids,
                "macs": n_macs,
                "paper_macs": paper_macs,
                "macs_diff": macs_diff,
                "macs_flagged": macs_flagged,
                "flops_notes": flops_ids,
            }
        )
        if flops_ids:
            macs_diff += " [" + ", ".join(flops_ids) + "]"
        if ids:
            diff += " [" + ", ".join(ids) + "]"
        opts = [row.model, f"{row.num_classes} classes", f"{row.input_size}px"]
        if row.attention:
            opts.append(
                row.attention + (f" {row.attention_kwargs}" if row.attention_kwargs else "")
            )
        if row.model_kwargs:
            opts.append(", ".join(f"{k}={v}" for k, v in row.model_kwargs.items()))
        mac_cells = (
            f"{n_macs / 1e9:.3f} | {2 * n_macs / 1e9:.3f}" if n_macs is not None else "- | -"
        )
        lines.append(
            f"| {row.name} | {'; '.join(opts)} | {params / 1e6:.3f} | {fmt(pm, '.2f')} | {diff} "
            f"| {mac_cells} | {fmt(paper.get('gflops'), '.2f')} | {fmt(paper_macs, '.3f')} "
            f"| {macs_diff} | {params * 4 / 2**20:.2f} | {fmt(paper.get('memory_mib'), '.2f')} |"
        )
    if table.params_notes:
        ids = ", ".join(f"[{i}]" for i in dict.fromkeys(n.id for n in table.params_notes))
        lines += ["", f"Parameter differences of this table: {ids}, explained at the end."]
    if table.paper_gflops:
        lines += [
            "",
            f"The paper's GFLOPs column counts {table.paper_gflops}; `paper as MACs` converts it.",
        ]
    if table.flops_notes:
        ids = ", ".join(f"[{i}]" for i in dict.fromkeys(n.id for n in table.flops_notes))
        lines += [f"FLOPs differences of this table: {ids}, explained at the end."]
    return "\n".join(lines), records


def explained_markdown(keys: list[str], records: list[dict]) -> str:
    """The "Differences over 0.5%, explained" section: every note of the tables ``keys``."""
    notes = params_notes(keys)
    lines = [
        "## Differences over 0.5%, explained",
        "",
        "Each note gives the rows (from every table above that lists them), the paper's number, "
        "ours, then what the paper's numbers fit, or the arithmetic showing that nothing does. "
        "Paper parameter counts from Memory(M) are MiB x 2^20 / 4, +-0.005 MiB of rounding. "
        "Notes are the `params_notes` of the specs.",
    ]
    for note_id, note in notes.items():
        lines += [
            "",
            f"### [{note_id}] {note.title}",
            "",
            "| table | row | paper (M) | paper Memory(M) | ours | ours MiB | diff |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in records:
            if note_id in r["notes"]:
                paper = r["row"].paper
                lines.append(
                    f"| {r['table'].paper.split(' (')[0]} {r['table'].table} | {r['row'].name} "
                    f"| {fmt(paper.get('params_m'), '.2f')} | {fmt(paper.get('memory_mib'), '.2f')} "
                    f"| {r['params']:,} | {r['params'] * 4 / 2**20:.2f} | {r['diff']} |"
                )
        lines += ["", note.text]
    unexplained = [r for r in records if r["flagged"] and not r["notes"]]
    if unexplained:
        lines += ["", "### Not explained yet", ""]
        lines += [
            f"- {r['table'].paper.split(' (')[0]} {r['table'].table}, {r['row'].name}: "
            f"paper {r['row'].paper['params_m']:.2f}M, ours {r['params']:,} ({r['diff']})"
            for r in unexplained
        ]
    return "\n".join(lines)


def flops_explained_markdown(keys: list[str], records: list[dict]) -> str:
    """The "FLOPs differences over 5%, explained" section: every flops note of ``keys``."""
    notes = params_notes(keys, kind="flops_notes")
    lines = [
        "## FLOPs differences over 5%, explained",
        "",
        "Each note gives its rows, the paper's FLOPs as MACs, ours and the tolerance the test "
        "holds the row to (`tests/experiments/test_fidelity.py`; 5% for rows without a note). "
        "Notes are the `flops_notes` of the specs.",
    ]
    for note_id, note in notes.items():
        lines += [
            "",
            f"### [{note_id}] {note.title}",
            "",
            "| table | row | paper MACs (G) | ours (G) | diff | tolerance |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in records:
            if note_id in r["flops_notes"] and r["macs"] is not None:
                tolerance = max(n.tolerance_pct for n in r["table"].flops_notes_for(r["row"].name))
                lines.append(
                    f"| {r['table'].paper.split(' (')[0]} {r['table'].table} | {r['row'].name} "
                    f"| {r['paper_macs']:.3f} | {r['macs'] / 1e9:.3f} | {r['macs_diff']} "
                    f"| {tolerance:g}% |"
                )
        lines += ["", note.text]
    unexplained = [r for r in records if r["macs_flagged"] and not r["flops_notes"]]
    if unexplained:
        lines += ["", "### Not explained yet", ""]
        lines += [
            f"- {r['table'].paper.split(' (')[0]} {r['table'].table}, {r['row'].name}: "
            f"{r['macs_diff']}"
            for r in unexplained
        ]
    return "\n".join(lines)


def _counts(model_name: str, num_classes: int, input_size: int, macs: bool, **kwargs):
    with torch.device("meta"):
        model = create_model(model_name, num_classes=num_classes, **kwargs)
        x = torch.empty(1, 3, input_size, input_size)
    return count_params(model), (count_flops(model, x) // 2 if macs else None)


def zoo_markdown(macs: bool = True) -> str:
    """Every module on ResNet-50 (ImageNet), and the zoo modules' own papers' numbers."""
    base_params, base_macs = _counts("resnet50", 1000, 224, macs)
    lines = [
        "## Every module on ResNet-50 (ImageNet, 1000 classes, 224 px)",
        "",
        f"Each at its default placement; plain ResNet-50: {base_params:,} parameters"
        + (f", {base_macs / 1e9:.3f} GMACs." if macs else "."),
        "",
        "| attention | level | placement | params | + params | MACs (G) | + MACs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in list_attentions(level=("module", "block", "conv")):
        params, n_macs = _counts("resnet50", 1000, 224, macs, attention=name)
        mac_cells = (
            f"{n_macs / 1e9:.3f} | {100 * (n_macs / base_macs - 1):+.2f}%" if macs else "- | -"
        )
        lines.append(
            f"| `{name}` | {attention_level(name)} | {default_placement(name)} | {params:,} "
            f"| {params - base_params:+,} | {mac_cells} |"
        )
    lines += [
        "",
        "## The zoo modules beside their own papers",
        "",
        "Rows of `attnzoo/experiments/zoo/module_params.yaml`: only numbers read from their "
        "source. Their FLOPs columns count multiply-adds.",
        "",
        "| row | model, options | params | paper (M) | diff | MACs (G) | paper (G) | MACs diff "
        "| source | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in load_module_params():
        params, n_macs = _counts(
            row.model, row.num_classes, row.input_size, macs, attention=row.attention,
            attention_kwargs=row.attention_kwargs, **row.model_kwargs,
        )  # fmt: skip
        diff, _ = compare(params, row.paper_params_m)
        macs_diff = (
            f"{100 * (n_macs / 1e9 / row.paper_gmacs - 1):+.1f}%"
            if n_macs is not None and row.paper_gmacs
            else "-"
        )
        opts = [row.model, row.attention, f"{row.num_classes} classes", f"{row.input_size}px"]
        opts += [f"{k}={v}" for k, v in {**row.attention_kwargs, **row.model_kwargs}.items()]
        lines.append(
            f"| {row.name} | {'; '.join(opts)} | {params:,} | {row.paper_params_m:.2f} | {diff} "
            f"| {fmt(n_macs / 1e9 if n_macs else None, '.3f')} | {fmt(row.paper_gmacs, '.2f')} "
            f"| {macs_diff} | {row.source} | {row.note} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tables", nargs="*", help=f"default: all of {', '.join(list_tables())}")
    p.add_argument("--no-macs", action="store_true", help="count parameters only (fast)")
    args = p.parse_args()
    keys = args.tables or list_tables()
    start = time.perf_counter()
    out = [
        "# Parameters and MACs, ours beside the papers'",
        "",
        "Generated by `python benchmarks/params_table.py > docs/params.md`. "
        "`diff` is (ours - paper) / paper; `(=)` means ours, truncated or rounded to the "
        "paper's two decimals, is the paper's number; `**` marks any other difference over "
        f"{DIFF_NOTE}%. MACs are multiply-accumulates of one forward pass on one image "
        "(torch.utils.flop_counter, conv/linear/matmul/attention products; elementwise ops "
        "not counted). HAM's GFLOPs column equals 2 x MACs; GAM's equals MACs; `MACs diff` "
        "compares ours with the paper's column converted to MACs, `**` marking differences "
        f"over {FLOPS_NOTE:g}%. "
        "Memory(M) in the HAM tables is parameters x 4 bytes in MiB. A `[note]` after a diff "
        'names the note of the last section, "Differences over 0.5%, explained", that covers '
        "the row.",
        "",
    ]
    records: list[dict] = []
    for key in keys:
        text, table_records = table_markdown(key, macs=not args.no_macs)
        records += table_records
        out.append(text)
        out.append("")
    if not args.tables:
        out.append(zoo_markdown(macs=not args.no_macs))
        out.append("")
    out.append(explained_markdown(keys, records))
    out.append("")
    if not args.no_macs:
        out.append(flops_explained_markdown(keys, records))
        out.append("")
    out.append(f"Generated in {time.perf_counter() - start:.0f} s, torch {torch.__version__}.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
