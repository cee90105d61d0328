"""The Triton gate kernels (``attnzoo.kernels.triton_gates``) against their contract,
``attnzoo.kernels.reference``.

The comparisons live in ``triton_interpret_cases.py``. Here they run on CPU tensors under
Triton's interpreter in one subprocess (``TRITON_INTERPRET=1`` must be set before triton is
imported, and nothing else in the suite may run interpreted), one test per case, and on CUDA
tensors in-process where a GPU is present (``cuda`` marker). Input checks, ``available()``
and the import without triton need no kernel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.kernels import triton_gates as tg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CASES_SCRIPT = HERE / "triton_interpret_cases.py"
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _load(CASES_SCRIPT, "triton_interpret_cases").CASES  # imports no triton


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    """Every case's outcome under the interpreter, from one subprocess (~20-30 s)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(CASES_SCRIPT)],
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


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted(name: str, interpreted: dict[str, str | None]) -> None:
    error = interpreted[name]
    if error:
        pytest.fail(error, pytrace=False)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda(name: str) -> None:
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1: the kernels would be interpreted")
    CASES[name]("cuda")


def _x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


GATE = torch.zeros(4, 1, 3)
BAD_INPUTS = [
    (lambda: tg.pool(_x(4, 5), None, 1, True), "3-d"),
    (lambda: tg.pool(_x(4, 5, 3, dtype=torch.float64), None, 1, True), "float32, bfloat16"),
    (lambda: tg.pool(torch.zeros(4, 5, 3, dtype=torch.int32), None, 1, True), "float32"),
    (lambda: tg.pool(_x(4, 3, 5).transpose(1, 2), None, 1, True), "x must be contiguous"),
    (lambda: tg.pool(_x(4, 5, 3), None, 2, True), "without groups g must be 1"),
    (lambda: tg.pool(_x(4, 5, 3), None, 0, True), "positive int"),
    (lambda: tg.pool(_x(4, 5, 3), torch.zeros(2, 5, dtype=torch.int32), 2, True), "int8"),
    (lambda: tg.pool(_x(4, 5, 3), torch.zeros(2, 6, dtype=torch.int8), 2, True), r"\[N, R\]"),
    (lambda: tg.pool(_x(4, 5, 3), torch.zeros(3, 5, dtype=torch.int8), 2, True), "multiple"),
    (
        lambda: tg.pool(_x(4, 5, 3), torch.zeros(5, 2, dtype=torch.int8).t(), 2, True),
        "groups must be contiguous",
    ),
    (lambda: tg.dot(_x(4, 5, 3), _x(4, 5, 2), None, 1), "differ in shape"),
    (lambda: tg.apply(_x(4, 5, 3), torch.zeros(4, 2, 3), None, 1), r"gate must be \[O, G, I\]"),
    (lambda: tg.apply(_x(4, 5, 3), GATE.bfloat16(), None, 1), "gate must be torch.float32"),
    (
        lambda: tg.apply(_x(4, 5, 3), torch.zeros(4, 1, 6)[:, :, ::2], None, 1),
        "gate must be contiguous",
    ),
    (lambda: tg.backward(_x(4, 5, 3), GATE, None, 1, GATE.double()), "bias must be torch.float32"),
    (
        lambda: tg.backward(_x(4, 5, 3), GATE, None, 1, None, GATE, GATE),
        "argmax must be torch.int32",
    ),
    (lambda: tg.backward(_x(4, 5, 3), GATE, None, 1, None, GATE.int(), GATE[:2]), "dmax must be"),
]


@pytest.mark.parametrize("call, message", BAD_INPUTS)
def test_rejects_bad_inputs(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_available() -> None:
    assert tg.available() == HAS_TRITON
    assert tg.available("cpu") == (HAS_TRITON and INTERPRETING)
    assert tg.available("cuda") == (HAS_TRITON and torch.cuda.is_available())
    assert not tg.available("meta")


@pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET=1 runs CPU tensors")
def test_cpu_tensors_need_the_interpreter() -> None:
    message = "TRITON_INTERPRET=1" if HAS_TRITON else "not installed"
    with pytest.raises(RuntimeError, match=message):
        tg.pool(_x(4, 5, 3), None, 1, True)


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    module = _load(Path(tg.__file__), "_triton_gates_without_triton")
    assert not module.available() and not module.available("cuda")
    with pytest.raises(RuntimeError, match="not installed"):
        module.apply(_x(4, 5, 3), GATE, None, 1)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETING, reason="needs triton, not interpreted")
def test_compiles_for_h100(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both kernels compile for sm_90 (no GPU needed): the interpreter does not type-check
    as the compiler does. ~5 s."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("no ptxas")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pool_kernel, gate_kernel, interpreted = tg._kernels()
    assert not interpreted
    common = {"O": "i32", "R": "i32", "I": "i32", "rows_per_sample": "i32"}
    pool_sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "groups_ptr": "*i8", "sum_ptr": "*fp32"}
    pool_sig |= {"max_ptr": "*fp32", "arg_ptr": "*i32", **common}
    pool_consts = dict(G=2, GP=2, HAS_Y=False, HAS_GROUPS=True, WANT_MAX=True)
    pool_consts |= dict(BLOCK_R=16, BLOCK_C=64, FLAT=False, EMULATE_BF16=False)
    gate_sig = {"x_ptr": "*bf16", "gate_ptr": "*fp32", "groups_ptr": "*i8", "bias_ptr": "*fp32"}
    gate_sig |= {"arg_ptr": "*i32", "dmax_ptr": "*fp32", "out_ptr": "*bf16", **common}
    gate_sig |= {"blocks_r": "i32"}
    gate_consts = dict(G=2, HAS_GROUPS=True, BACKWARD=True, HAS_BIAS=True, HAS_MAX=True)
    gate_consts |= dict(BLOCK_R=64, BLOCK_C=32, FLAT=True, EMULATE_BF16=False)
    for kernel, sig, consts in [
        (pool_kernel, pool_sig, pool_consts),
        (gate_kernel, gate_sig, gate_consts),
    ]:
        sig = {**sig, **{name: "constexpr" for name in consts}}
        compiled = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))
        assert "ld.global" in compiled.asm["ptx"]
