"""A tiny two-row table (resnet20 with and without SE on digits) in a temporary spec folder,
for the reproduce / report / --jobs / --launcher tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_table import TINY_TABLE

from attnzoo.experiments import spec as spec_module


@pytest.fixture
def tiny_table_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path``, with the table "tiny" in ``tmp_path/tables`` as the spec folder."""
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "tiny.yaml").write_text(TINY_TABLE)
    monkeypatch.setattr(spec_module, "TABLE_DIR", tables)
    return tmp_path
