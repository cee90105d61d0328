"""The paper-table specs: every table loads and validates; bad specs give clear errors."""

from __future__ import annotations

import pytest

from attnzoo.experiments import list_tables, load_table
from attnzoo.experiments import spec as spec_module


def test_tables_are_listed():
    assert {"ham_table4", "gam_table1", "csm_table2"} <= set(list_tables())


@pytest.mark.parametrize("key", list_tables())
def test_every_table_loads(key):
    table = load_table(key)
    assert table.rows and table.source.endswith(".txt")
    names = [r.name for r in table.rows]
    assert len(names) == len(set(names)), "row names must be unique"
    for row in table.rows:
        assert row.paper or row.note, f"{key}: {row.name} has neither paper numbers nor a note"


def test_ham_table4_row():
    row = next(r for r in load_table("ham_table4").rows if r.name == "ResNet56 + HAM")
    assert (row.model, row.attention, row.num_classes, row.input_size) == (
        "resnet56",
        "ham",
        10,
        32,
    )
    assert row.paper["params_m"] == 0.85
    assert row.paper["top1_err"] == {"cifar10": 6.25, "cifar100": 29.58}


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_module, "TABLE_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "text,message",
    [
        ("rows: []", "non-empty list of rows"),
        ("- a\n- b", "must be a YAML mapping"),
        (
            "rows: [{name: a, model: resnet21, dataset: x, num_classes: 10, input_size: 32}]",
            "unknown model 'resnet21'",
        ),
        (
            "rows: [{name: a, model: resnet20, attention: hamm, dataset: x, num_classes: 10, "
            "input_size: 32}]",
            "unknown attention 'hamm'",
        ),
        (
            "rows: [{name: a, model: resnet20, dataset: x, num_classes: 10, input_size: 32, "
            "colour: red}]",
            "unknown key",
        ),
        ("rows: [{name: a, model: resnet20}]", "missing"),
        (
            "rows: [{name: a, model: resnet20, dataset: x, num_classes: 10, input_size: 32, "
            "paper: {acc: 1}}]",
            "unknown paper key",
        ),
        ("rows: [a: [b", "cannot read"),
    ],
)
def test_bad_specs(table_dir, text, message):
    (table_dir / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_table("bad")


def test_unknown_table_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown table 'nope'; choose one of: .*ham_table4"):
        load_table("nope")


def test_params_notes_resolve_and_cover_the_rcca_rows():
    notes = spec_module.params_notes()
    assert {"rcca", "resnext50", "resnet20", "mobilenet_bam"} <= set(notes)
    assert all(n.title and n.text for n in notes.values())
    table = load_table("ham_table6")
    assert table.notes_for("ResNet101 + RCCA(R=2)") == ["rcca"]
    assert table.notes_for("ResNet101") == []
    # every RCCA row of the HAM tables is under the rcca note
    for key in ("ham_table2", "ham_table4", "ham_table5", "ham_table6"):
        t = load_table(key)
        for row in t.rows:
            if row.attention == "rcca":
                assert "rcca" in t.notes_for(row.name), (key, row.name)


ROW = "{name: a, model: resnet20, dataset: x, num_classes: 10, input_size: 32}"


@pytest.mark.parametrize(
    "notes,message",
    [
        ("params_notes: {id: x}", "expected a list of notes"),
        ("params_notes: [x]", "expected a mapping"),
        ("params_notes: [{id: x, rows: [a], colour: red}]", "unknown key"),
        ("params_notes: [{rows: [a]}]", "needs an id"),
        ("params_notes: [{id: x, rows: []}]", "non-empty list of row names"),
        ("params_notes: [{id: x, rows: [b]}]", r"no such row\(s\) \['b'\]"),
        ("params_notes: [{id: x, rows: [a], title: t}]", "both title and text"),
    ],
)
def test_bad_params_notes(table_dir, notes, message):
    (table_dir / "bad.yaml").write_text(f"rows: [{ROW}]\n{notes}\n")
    with pytest.raises(ValueError, match=message):
        load_table("bad")


def test_params_note_text_is_given_exactly_once(table_dir):
    (table_dir / "one.yaml").write_text(
        f"rows: [{ROW}]\nparams_notes: [{{id: x, rows: [a], title: T, text: why}}]\n"
    )
    (table_dir / "two.yaml").write_text(f"rows: [{ROW}]\nparams_notes: [{{id: x, rows: [a]}}]\n")
    notes = spec_module.params_notes(["two"])
    assert list(notes) == ["x"] and notes["x"].text == "why"
    (table_dir / "three.yaml").write_text(f"rows: [{ROW}]\nparams_notes: [{{id: y, rows: [a]}}]\n")
    with pytest.raises(ValueError, match=r"\['y'\] have no title and text"):
        spec_module.params_notes(["three"])
    (table_dir / "four.yaml").write_text(
        f"rows: [{ROW}]\nparams_notes: [{{id: x, rows: [a], title: T, text: again}}]\n"
    )
    with pytest.raises(ValueError, match="'x' has its text twice"):
        spec_module.params_notes()
