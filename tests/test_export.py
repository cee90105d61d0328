"""ONNX and torch.export for every registered attention, alone and in ResNets.

Each ONNX file is exported at one size and run in onnxruntime at other batch and spatial
sizes, so the dynamic axes are exercised. Weights are random (zero-initialised gates would
hide branches from the comparison). The full resnet50 x attention matrix is measured by
``benchmarks/export_matrix.py`` (docs/export.md), not here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.utils.random_weights import randomize_

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from attnzoo.export import attention_for_export, check_onnx, export_onnx  # noqa: E402

NAMES = attnzoo.list_attentions(level=("module", "block", "conv"))
MODEL_LEVEL = attnzoo.list_attentions(level="model")
CHANNELS = 16
# The legacy TorchScript exporter (a second or two faster per ResNet than the dynamo one)
# exports the ResNets here; these attentions need the dynamo exporter instead.
NEEDS_DYNAMO = {"rcca": "its EyeLike node has no onnxruntime kernel for that dtype"}


def _module(name: str):
    torch.manual_seed(0)
    module, make = attention_for_export(name, CHANNELS)
    return randomize_(module).eval(), make


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name", NAMES)
def test_module_onnx_dynamic_axes(name: str, tmp_path) -> None:
    module, make = _module(name)
    path = export_onnx(module, tmp_path / f"{name}.onnx", example_inputs=make(2, 8, 8))
    assert path.exists() and not list(tmp_path.glob("*.tmp"))
    for size in [(3, 7, 5), (1, 1, 1)]:
        assert check_onnx(module, path, make(*size)) < 1e-5, size


@pytest.mark.parametrize("name", NAMES)
def test_module_torch_export_dynamic(name: str) -> None:
    module, make = _module(name)
    dim = torch.export.Dim.DYNAMIC
    example = make(2, 8, 8)
    program = torch.export.export(
        module, example, dynamic_shapes=tuple({0: dim, 2: dim, 3: dim} for _ in example)
    )
    for size in [(3, 7, 5), (1, 1, 1)]:
        inputs = make(*size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*inputs), module(*inputs))


def _resnet(name: str, attention: str | None) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(attnzoo.create_model(name, attention=attention)).eval()


@pytest.mark.parametrize("attention", [None, *NAMES, *MODEL_LEVEL])
def test_resnet20_onnx(attention: str | None, tmp_path) -> None:
    model = _resnet("resnet20", attention)
    exporter = None if attention in NEEDS_DYNAMO else "torchscript"
    path = export_onnx(model, tmp_path / "r20.onnx", input_size=(3, 32, 32), exporter=exporter)
    for shape in [(1, 3, 24, 24), (3, 3, 32, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            scale = float(model(x).abs().max())
        diff = check_onnx(model, path, x)
        assert diff < 1e-4 * max(1.0, scale), (shape, diff, scale)


@pytest.mark.parametrize("attention", [None, "cbam", "eca", "coord"])
def test_resnet50_onnx(attention: str | None, tmp_path) -> None:
    model = _resnet("resnet50", attention)
    path = export_onnx(model, tmp_path / "r50.onnx", input_size=(3, 64, 64), exporter="torchscript")
    for shape in [(1, 3, 48, 48), (2, 3, 64, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            scale = float(model(x).abs().max())
        assert check_onnx(model, path, x) < 1e-4 * max(1.0, scale), shape


def test_export_falls_back_and_reports(tmp_path, monkeypatch) -> None:
    import attnzoo.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("no dynamo today")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    module, make = _module("se")
    with pytest.warns(UserWarning, match="no dynamo today"):
        path = export_onnx(module, tmp_path / "se.onnx", example_inputs=make(2, 8, 8))
    assert check_onnx(module, path, make(3, 7, 5)) < 1e-5
    monkeypatch.setattr(export, "_export_torchscript", broken)
    with pytest.raises(RuntimeError, match="dynamo exporter.*torchscript exporter"):
        export_onnx(module, tmp_path / "none.onnx", example_inputs=make(2, 8, 8))
    assert not (tmp_path / "none.onnx").exists() and not list(tmp_path.glob("*.tmp"))


def test_missing_extra_names_it(monkeypatch, tmp_path) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"attnzoo\[export\]"):
        check_onnx(nn.Identity(), tmp_path / "x.onnx", torch.randn(1, 3, 2, 2))
