"""Export a model (or an attention module) to ONNX and check it against onnxruntime.

``export_onnx(model, path)`` writes an ONNX file with a dynamic batch and spatial size
(``dynamic=True``), choosing the exporter that works: first ``torch.onnx.export`` with
``dynamo=True`` and ``dynamic_shapes`` (the torch.export-based exporter), then the legacy
TorchScript exporter with ``dynamic_axes``; a fallback is announced with a warning that
gives the first exporter's error, and if both fail the ``RuntimeError`` carries both
reasons. The file is checked with ``onnx.checker`` and written atomically (a temporary
file in the same directory, then ``os.replace``), so ``path`` never holds a half-written
model.

``check_onnx(model, path, inputs)`` runs the file in onnxruntime (CPU) and returns the
largest absolute difference from ``model(*inputs)`` in eval mode.

``attention_for_export(name, channels)`` builds one registered attention as a module whose
inputs are plain tensors (a block-level attention such as BA-Net's bridge takes the block's
earlier outputs as extra inputs), with a maker of example inputs of any (N, H, W).

Both need the ``export`` extra: ``pip install 'attnzoo[export]'`` (onnx, onnxruntime,
onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXTRA_HINT = "pip install 'attnzoo[export]'"
EXPORTERS = ("dynamo", "torchscript")


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the {module!r} package, which is not installed; "
            f"install the export extra: {EXTRA_HINT}"
        ) from err


def _example_inputs(
    model: nn.Module, input_size: Sequence[int], batch_size: int
) -> tuple[torch.Tensor, ...]:
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return (torch.randn(batch_size, *input_size, device=device, dtype=dtype),)


def _dynamic_dims(tensor: torch.Tensor) -> dict[int, str]:
    """Axis -> name for the dynamic axes of an (N, C, H, W) (or (N, ...)) tensor: N, and
    H and W of a 4-d tensor."""
    dims = {0: "batch"}
    if tensor.dim() == 4:
        dims.update({2: "height", 3: "width"})
    return dims


def _export_dynamo(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool, opset: int | None
) -> None:
    dynamic_shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = tuple(
            {axis: auto for axis in _dynamic_dims(t)} if isinstance(t, torch.Tensor) else None
            for t in inputs
        )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    if dynamic:
        _check_dynamic_graph(program.model_proto, inputs)
    program.save(str(path), external_data=False)


def _check_dynamic_graph(proto: Any, inputs: tuple[torch.Tensor, ...]) -> None:
    """Raise if torch.export specialised an axis that should stay dynamic (``Dim.AUTO``
    falls back to a static size when the model's code pins it, e.g. adaptive pooling to a
    size that does not divide the input)."""
    for graph_input, tensor in zip(proto.graph.input, inputs, strict=False):
        shape = graph_input.type.tensor_type.shape.dim
        static = [
            axis
            for axis in _dynamic_dims(tensor)
            if axis < len(shape) and shape[axis].HasField("dim_value")
        ]
        if static:
            raise RuntimeError(
                f"the exported graph fixed axis/axes {static} of input {graph_input.name!r} "
                f"to {[shape[a].dim_value for a in static]}: the model's code does not allow "
                "a dynamic size there"
            )


def _export_torchscript(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, dynamic: bool, opset: int | None
) -> None:
    names = [f"input_{i}" for i in range(len(inputs))]
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {n: _dynamic_dims(t) for n, t in zip(names, inputs, strict=True)}
        dynamic_axes["output"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            opset_version=opset or 17,
            do_constant_folding=True,
        )


class EarlierAsInputs(nn.Module):
    """A block-level attention ``module(x, [e0, ...])`` as ``forward(x, e0, ...)`` with a
    fixed number of plain tensor inputs, which the exporters can trace (they cannot give
    dynamic shapes to a list, nor to ``*args``). Build it with ``earlier_as_inputs``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class _OneEarlier(EarlierAsInputs):
    def forward(self, x: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        return self.module(x, [e0])


class _TwoEarlier(EarlierAsInputs):
    def forward(self, x: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
        return self.module(x, [e0, e1])


class _ThreeEarlier(EarlierAsInputs):
    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor
    ) -> torch.Tensor:
        return self.module(x, [e0, e1, e2])


_EARLIER_WRAPPERS = {1: _OneEarlier, 2: _TwoEarlier, 3: _ThreeEarlier}


def earlier_as_inputs(module: nn.Module, count: int) -> EarlierAsInputs:
    """Wrap a block-level attention that reads ``count`` earlier outputs (1 to 3)."""
    if count not in _EARLIER_WRAPPERS:
        raise ValueError(
            f"a block-level attention with {count} earlier outputs cannot be wrapped for "
            f"export; wrappers exist for {sorted(_EARLIER_WRAPPERS)}"
        )
    return _EARLIER_WRAPPERS[count](module)


def attention_for_export(
    name: str, channels: int, **kwargs: Any
) -> tuple[nn.Module, Callable[[int, int, int], tuple[torch.Tensor, ...]]]:
    """``create_attention(name, channels, **kwargs)`` ready for ``export_onnx``, and
    ``make(n, h, w)``, which returns random example inputs of batch ``n`` and size ``h x w``.

    A block-level attention is wrapped by ``earlier_as_inputs`` with one earlier output of
    ``channels`` channels unless ``earlier_channels`` is given.
    """
    from attnzoo.registry import attention_level, create_attention

    if attention_level(name) == "block":
        kwargs.setdefault("earlier_channels", (channels,))
        in_channels = (channels, *kwargs["earlier_channels"])
        module: nn.Module = earlier_as_inputs(
            create_attention(name, channels, **kwargs), len(in_channels) - 1
        )
    else:
        module, in_channels = create_attention(name, channels, **kwargs), (channels,)

    def make(n: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(n, c, h, w) for c in in_channels)

    return module, make


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: Sequence[int] = (3, 224, 224),
    dynamic: bool = True,
    opset: int | None = None,
    *,
    batch_size: int = 2,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    exporter: str | None = None,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path`` and return the path.

    The example input is ``(batch_size, *input_size)``; ``example_inputs`` replaces it
    (a tuple of tensors, for a module with several inputs). With ``dynamic`` the batch and,
    for 4-d inputs, the height and width are dynamic axes. ``exporter`` forces one of
    ``"dynamo"`` / ``"torchscript"``; by default the dynamo exporter is tried first and the
    TorchScript one is the fallback (with a warning giving the reason). ``opset`` defaults to
    each exporter's own default (17 for the TorchScript exporter).
    """
    onnx = _require("onnx")
    _require("onnxscript")
    if exporter is not None and exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of: {', '.join(EXPORTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = (
        tuple(example_inputs)
        if example_inputs is not None
        else _example_inputs(model, input_size, batch_size)
    )
    was_training = model.training
    model.eval()
    order = [exporter] if exporter else list(EXPORTERS)
    errors: list[str] = []
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        for name in order:
            try:
                with torch.no_grad():
                    (_export_dynamo if name == "dynamo" else _export_torchscript)(
                        model, inputs, tmp, dynamic, opset
                    )
                onnx.checker.check_model(str(tmp), full_check=True)
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                errors.append(f"{name} exporter: {type(err).__name__}: {_first_line(err)}")
                continue
            if errors:
                warnings.warn(
                    f"ONNX export fell back to the {name} exporter; " + "; ".join(errors),
                    stacklevel=2,
                )
            os.replace(tmp, path)
            return path
        raise RuntimeError(
            f"cannot export {type(model).__name__} to ONNX: " + "; ".join(errors)
        ) from None
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:500]
    return text[:500]


def check_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: torch.Tensor | Sequence[torch.Tensor],
) -> float:
    """Largest absolute difference between ``model(*inputs)`` (eval mode, no grad) and the
    ONNX file at ``path`` run by onnxruntime on the CPU with the same inputs."""
    ort = _require("onnxruntime")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*inputs)
    finally:
        model.train(was_training)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        meta.name: t.detach().cpu().numpy()
        for meta, t in zip(session.get_inputs(), inputs, strict=True)
    }
    (got,) = session.run(None, feeds)[:1]
    got = torch.from_numpy(got)
    expected = expected.detach().cpu().to(got.dtype)
    if got.shape != expected.shape:
        raise AssertionError(
            f"ONNX output shape {tuple(got.shape)} != model output shape {tuple(expected.shape)}"
        )
    return float((got - expected).abs().max()) if got.numel() else 0.0
