"""The papers' tables as experiment specs (one YAML file per table, see spec.py)."""

from .spec import Row, Table, list_tables, load_table

__all__ = ["Row", "Table", "list_tables", "load_table"]
