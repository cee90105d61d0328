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
