"""The gate modules' kernel nodes (``attention/fused.py``, HAM's separated gate) on the Triton
kernels, as they run on a GPU: checked on the CPU under Triton's interpreter in one
subprocess (``triton_module_cases.py``), against the plain path in float64, forward,
backward and inference, both layouts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "triton_module_cases.py"


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str | None]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the interpreter run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


CASE_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}-{layout}"
    for name, kwargs in [
        ("se", {}),
        ("eca", {}),
        ("cbam", {}),
        ("ham", {}),
        ("ham", {"spatial": "cbam"}),
    ]
    for layout in ("nchw", "nhwc")
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_IDS)
def test_module_on_triton_kernels(outcomes, case) -> None:
    assert case in outcomes, f"case {case} did not run"
    assert outcomes[case] is None, outcomes[case]
