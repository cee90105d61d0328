"""Fixtures for the reliability tests (resume, signals, run directories, DDP)."""

from __future__ import annotations

import pytest
from run_helpers import TINY, BackgroundRun


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> BackgroundRun:
    """The uninterrupted ``TINY`` run, in its own process, started when first asked for."""
    return BackgroundRun(tmp_path_factory.mktemp("reference") / "run", *TINY)
