"""timm's SE, ECA and CBAM with our weights give our outputs and gradients (timm is a dev
dependency: these are real checks, not skipped), and bench --timm's result structure."""

from __future__ import annotations

import pytest
import timm  # noqa: F401  (a dev dependency: fail loudly if it is missing)
import torch

from attnzoo import create_model
from attnzoo.attention.cbam import CBAM
from attnzoo.measure.bench import bench, format_bench
from attnzoo.measure.timm_compare import (
    TOLERANCE,
    check_module,
    randomize_,
    swap_in_timm,
    timm_equivalent,
)
from attnzoo.registry import create_attention


@pytest.mark.parametrize("attention", ["se", "eca", "cbam"])
@pytest.mark.parametrize("channels", [16, 64, 256])
def test_same_outputs_and_gradients_with_the_same_weights(attention, channels):
    diffs = check_module(attention, channels)
    assert diffs["output"] < TOLERANCE
    assert diffs["input_grad"] < 1e-4 and diffs["param_grad"] < 1e-4


@pytest.mark.parametrize(
    "attention,kwargs",
    [
        ("se", {"rd_rule": "round8"}),
        ("se", {"rd_channels": 5}),
        ("eca", {"kernel_size": 1}),  # timm never picks k < 3 by itself
        ("eca", {"kernel_size": 7}),
        ("cbam", {"spatial": False}),
        ("cbam", {"kernel_size": 3}),
    ],
)
def test_options_map_too(attention, kwargs):
    assert check_module(attention, 64, kwargs)["output"] < TOLERANCE


def test_the_check_sees_a_difference():
    ours = randomize_(create_attention("cbam", 32))
    theirs = timm_equivalent(ours)
    with torch.no_grad():
        theirs.spatial.conv.conv.weight[0, 0, 3, 3] += 0.1
    from attnzoo.measure.timm_compare import compare

    assert compare(ours, theirs, torch.randn(2, 32, 8, 8))["output"] > 1e-3


def test_unmatched_options_are_refused():
    with pytest.raises(ValueError, match="no counterpart of adaptive"):
        timm_equivalent(CBAM(32, adaptive=True))
    with pytest.raises(ValueError, match="no timm counterpart for 'ham'"):
        swap_in_timm(create_model("resnet20", attention="ham"), "ham")


@pytest.mark.parametrize("attention", ["se", "eca", "cbam"])
def test_whole_network_swap_is_equal(attention):
    model = create_model("resnet20", attention=attention)
    swapped, report = swap_in_timm(model, attention, input_size=16)
    assert report["modules"] == 9  # one per block
    assert report["output_max_abs_diff"] < TOLERANCE
    names = {type(m).__module__ for m in swapped.modules()}
    assert any(n.startswith("timm.") for n in names)
    assert not any(type(m).__name__ == "SqueezeExcite" for m in swapped.modules())
    assert sum(p.numel() for p in swapped.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_stage_placement_swaps_too():
    model = create_model("resnet20", attention="eca", placement="stage")
    assert swap_in_timm(model, "eca", input_size=16)[1]["modules"] == 2


def test_bench_timm_rows_and_ratio():
    result = bench(
        "resnet20",
        ["none", "se", "ham"],
        ["channels_last"],
        batch_size=2,
        input_size=8,
        repeats=1,
        warmup=0,
        timm=True,
    )
    cases = [(r["attention"], r["impl"]) for r in result["rows"]]
    assert cases == [("none", "ours"), ("se", "ours"), ("se", "timm"), ("ham", "ours")]
    ours, theirs = result["rows"][1], result["rows"][2]
    assert ours["params"] == theirs["params"]
    assert ours["ours_over_timm"] is None
    assert theirs["ours_over_timm"] == pytest.approx(ours["step_ms"] / theirs["step_ms"])
    assert set(result["timm_check"]) == {"se"}
    assert result["timm_check"]["se"]["output_max_abs_diff"] < TOLERANCE
    text = format_bench(result)
    assert "| ours / timm |" in text and "| se (timm) | channels_last |" in text
    assert text.count("\n| ") == 2 + 4 and "se: 9 modules, outputs " in text


def test_bench_timm_on_each_device(device):
    result = bench(
        "resnet20",
        ["none", "eca"],
        ["channels_last"],
        batch_size=2,
        input_size=8,
        repeats=2,
        warmup=0,
        timm=True,
        device=device,
    )
    assert [(r["attention"], r["impl"]) for r in result["rows"]] == [
        ("none", "ours"),
        ("eca", "ours"),
        ("eca", "timm"),
    ]
    ours, theirs = result["rows"][1:]
    assert theirs["ours_over_timm"] == pytest.approx(ours["step_ms"] / theirs["step_ms"])
    assert result["timm_check"]["eca"]["output_max_abs_diff"] < TOLERANCE  # checked on the CPU
    assert torch.device(result["settings"]["device"]).type == device.type


@pytest.mark.parametrize("attention", ["se", "cbam"])
def test_the_check_refuses_a_conversion_that_differs(attention, monkeypatch):
    # A timm layer whose weights are off by 1% must fail the check before any timing.
    from attnzoo.measure import timm_compare

    real = timm_compare.timm_equivalent

    def slightly_wrong(module):
        theirs = real(module)
        with torch.no_grad():
            for p in theirs.parameters():
                p.mul_(1.01)
        return theirs

    monkeypatch.setattr(timm_compare, "timm_equivalent", slightly_wrong)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention=attention)
    with pytest.raises(RuntimeError, match=f"timm's {attention} differs from ours"):
        timm_compare.swap_in_timm(model, attention)
