"""Export every registered attention, alone and inside resnet20 and resnet50, to
ONNX (dynamic batch and spatial size) and through torch.export; print a markdown table.

    .venv/bin/python benchmarks/export_matrix.py [name ...]

Each ONNX file is exported at one size and checked in onnxruntime at others (module:
exported at 2x16x8x8, run at 3x16x7x5 and 1x16x1x1; resnet20: exported at 2x3x32x32, run
at 1x3x24x24 and 3x3x32x32; resnet50: exported at 2x3x64x64, run at 1x3x48x48 and
3x3x64x64). torch.export: the module with dynamic batch, height and width, run at 3x16x7x5.
"max diff" is the largest absolute difference from eager PyTorch (fp32, eval mode) over
all of these, divided by the largest output magnitude where that is above 1 (random
weights make some ResNet outputs large). "ok (torchscript)": the dynamo (torch.export)
exporter failed and the TorchScript one was used.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import attnzoo
from attnzoo.export import attention_for_export, check_onnx, export_onnx
from attnzoo.registry import attention_level
from attnzoo.utils.machine import describe_machine
from attnzoo.utils.random_weights import randomize_

CHANNELS = 16


def module_and_inputs(name: str):
    torch.manual_seed(0)
    module, make = attention_for_export(name, CHANNELS)
    return randomize_(module).eval(), make


def onnx_diff(model: nn.Module, example, runs, tmp: Path) -> tuple[float, str]:
    """Max difference over ``runs``, and "" or the note that the dynamo exporter failed and
    the TorchScript one was used."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, tmp / "model.onnx", example_inputs=example)
    fell_back = any("fell back" in str(w.message) for w in caught)
    return max(relative(check_onnx(model, path, inputs), model, inputs) for inputs in runs), (
        " (torchscript)" if fell_back else ""
    )


def relative(diff: float, model: nn.Module, inputs) -> float:
    """``diff`` over the output's largest magnitude (or over 1, if that is smaller)."""
    with torch.no_grad():
        return diff / max(1.0, float(model(*inputs).abs().max()))


def torch_export_diff(model: nn.Module, make) -> float:
    dim = torch.export.Dim.DYNAMIC
    example = make(2, 8, 8)
    program = torch.export.export(
        model, example, dynamic_shapes=tuple({0: dim, 2: dim, 3: dim} for _ in example)
    )
    inputs = make(3, 7, 5)
    with torch.no_grad():
        diff = float((program.module()(*inputs) - model(*inputs)).abs().max())
    return relative(diff, model, inputs)


def attempt(fn, *args) -> tuple[str, float]:
    try:
        result = fn(*args)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return f"fail: {type(err).__name__}: {str(err).strip().splitlines()[0][:120]}", math.nan
    diff, note = result if isinstance(result, tuple) else (result, "")
    return "ok" + note, diff


def resnet(name: str, attention: str | None, size: int):
    torch.manual_seed(0)
    model = randomize_(attnzoo.create_model(name, attention=attention)).eval()
    small = size * 3 // 4
    example = (torch.randn(2, 3, size, size),)
    runs = [(torch.randn(1, 3, small, small),), (torch.randn(3, 3, size, size),)]
    return model, example, runs


def main(names: list[str]) -> None:
    import onnx
    import onnxruntime

    print(
        f"CPU: {describe_machine()}; onnx {onnx.__version__}, onnxruntime "
        f"{onnxruntime.__version__}\n"
    )
    rows = []
    print("| module | ONNX module | ONNX resnet20 | ONNX resnet50 | torch.export | max diff | s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        start = time.perf_counter()
        diffs = []
        cells = []
        standalone = name != "(none)" and attention_level(name) != "model"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if not standalone:
                cells.append("-")
            else:
                module, make = module_and_inputs(name)
                status, d = attempt(
                    onnx_diff, module, make(2, 8, 8), [make(3, 7, 5), make(1, 1, 1)], tmp
                )
                cells.append(status)
                diffs.append(d)
            attention = None if name == "(none)" else name
            for model_name, size in (("resnet20", 32), ("resnet50", 64)):
                model, example, runs = resnet(model_name, attention, size)
                status, d = attempt(onnx_diff, model, example, runs, tmp)
                cells.append(status)
                diffs.append(d)
            if not standalone:
                cells.append("-")
            else:
                status, d = attempt(torch_export_diff, module, make)
                cells.append(status)
                diffs.append(d)
        worst = max(diffs)
        row = (
            f"| {name} | "
            + " | ".join(cells)
            + f" | {worst:.1e} | {time.perf_counter() - start:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["(none)", *attnzoo.list_attentions()])
