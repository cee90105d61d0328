"""Run under ``TRITON_INTERPRET=1`` by ``test_triton_modules.py``: the gate modules with the
kernels' nodes routed to the Triton kernels (CPU tensors, interpreted) against the plain
PyTorch path in float64; prints one JSON line {case: error message or null}."""

from __future__ import annotations

import copy
import json
import sys

import torch

from attnzoo import kernels
from attnzoo.attention.layers import plain_gates
from attnzoo.kernels import triton_gates
from attnzoo.registry import create_attention

CASES = [
    ("se", {}),
    ("eca", {}),
    ("cbam", {}),
    ("ham", {}),
    ("ham", {"spatial": "cbam"}),
]


CALLS: list[str] = []


def route_to_triton() -> None:
    """The nodes' four operations go to the Triton module for every tensor (counted)."""

    def impl(x: torch.Tensor):  # noqa: ANN202
        CALLS.append(str(x.dtype))
        return triton_gates

    kernels._impl = impl  # noqa: SLF001


def check(name: str, kwargs: dict, layout: str) -> None:
    torch.manual_seed(0)
    module = create_attention(name, 16, **kwargs).train()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    reference = copy.deepcopy(module).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 5, 4, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    if layout == "nhwc":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    xk = x.clone().requires_grad_()
    CALLS.clear()
    with kernels.kernels("on"):
        out = module(xk)
    out.backward(grad)
    if len(CALLS) < 4:
        raise AssertionError(f"the Triton kernels ran {len(CALLS)} times, expected >= 4")
    xr = x.double().requires_grad_()
    with plain_gates():
        want = reference(xr)
    want.backward(grad.double())
    for what, a, b in [("output", out, want), ("input grad", xk.grad, xr.grad)] + [
        (f"grad {n}", p.grad, q.grad)
        for (n, p), q in zip(module.named_parameters(), reference.parameters(), strict=True)
    ]:
        err = (a.double() - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        if not err <= 1e-4 * scale:
            raise AssertionError(f"{what}: max error {err:.2e} (scale {scale:.2e})")
    module.eval()
    reference.eval()
    with torch.no_grad(), kernels.kernels("on"):
        got = module(x)
    err = (got.double() - reference(x.double())).abs().max().item()
    if not err <= 1e-4:
        raise AssertionError(f"inference: max error {err:.2e}")


def main() -> int:
    route_to_triton()
    results = {}
    for name, kwargs in CASES:
        for layout in ("nchw", "nhwc"):
            key = f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}-{layout}"
            try:
                check(name, kwargs, layout)
                results[key] = None
            except Exception as error:  # noqa: BLE001  (reported per case)
                results[key] = f"{type(error).__name__}: {error}"
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
