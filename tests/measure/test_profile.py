"""attnzoo.measure.profile and `attnzoo profile`: the counts against hand computation and the
structure of the output (never the timings themselves); out-of-memory handling on the CPU (a
stand-in error) and, where a GPU is present, memory and latency on CUDA."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from attnzoo.cli import main
from attnzoo.measure import ModelSpec, count_flops, count_params, format_profile, profile

# The module (``attnzoo.measure.profile`` is the function of the same name).
profile_module = importlib.import_module("attnzoo.measure.profile")


def test_flops_of_a_conv_and_a_linear_by_hand():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 5 * 5, 4)
    )
    x = torch.randn(1, 3, 5, 5)
    conv_macs = 8 * 5 * 5 * 3 * 3 * 3
    linear_macs = 8 * 5 * 5 * 4
    assert count_flops(model, x) == 2 * (conv_macs + linear_macs)
    # Training on 2 images: forward; backward = weight grads of both layers + the input grad
    # of the linear layer (the conv's input needs no gradient).
    train = count_flops(model, torch.cat([x, x]), train=True)
    assert train == 2 * 2 * (conv_macs + linear_macs) + 2 * 2 * (conv_macs + 2 * linear_macs)


def test_resnet20_macs_match_the_layer_sum():
    """Every conv and the classifier of resnet20, summed from the architecture by hand."""
    macs = 3 * 16 * 9 * 32 * 32  # stem
    for c_in, c, hw in ((16, 16, 32), (16, 32, 16), (32, 64, 8)):
        macs += c_in * c * 9 * hw * hw + c * c * 9 * hw * hw  # first block of the stage
        macs += 2 * (2 * c * c * 9 * hw * hw)  # two more blocks
    macs += 64 * 10
    result = profile(ModelSpec("resnet20"), timing=False, memory=False)
    assert result["rows"][0]["macs"] == macs
    assert result["rows"][0]["params"] == 269_722


def test_profile_rows_and_ratios():
    result = profile(
        ModelSpec("resnet20", "se"),
        input_size=16,
        batch_size=4,
        repeats=1,
        timing=True,
        memory=False,
    )
    none, se = result["rows"]
    assert (none["attention"], se["attention"]) == ("none", "se")
    assert se["params"] - none["params"] == 2_373
    assert se["macs"] > none["macs"] and se["train_flops"] > 2 * se["macs"]
    assert set(result["ratios"]) == {"params", "macs", "train_ms", "infer_ms"}
    assert result["ratios"]["params"] == pytest.approx(se["params"] / none["params"])
    assert se["train_ms"] > 0 and se["infer_ms"] > 0
    text = format_profile(result)
    assert "MACs (fwd, 1 img)" in text and "FLOPs = 2 x MACs" in text
    assert text.count("\n| ") == 4  # header, separator and two rows


def test_peak_memory_is_measured_in_a_fresh_process():
    result = profile(ModelSpec("resnet20"), input_size=16, batch_size=8, timing=False)
    assert result["rows"][0]["peak_train_mib"] >= 0
    assert "ru_maxrss" in result["settings"]["memory_source"]
    assert "peak train MiB on cpu: peak resident memory (ru_maxrss)" in format_profile(result)


def test_model_level_attention_profiles():
    result = profile(ModelSpec("resnet20", "abn"), timing=False, memory=False)
    assert result["rows"][1]["params"] == count_params(ModelSpec("resnet20", "abn").build())


def test_cli_json(capsys):
    code = main(
        [
            "profile",
            "--model",
            "resnet20",
            "--attention",
            "eca",
            "--no-timing",
            "--no-memory",
            "--json",
            "--input-size",
            "16",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["attention"] for r in result["rows"]] == ["none", "eca"]
    assert result["settings"]["input_size"] == 16


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--model", "resnet20", "--attention", "hamm"], "unknown attention 'hamm'"),
        (
            ["--model", "resnet20", "--attention", "se", "--attention-kwargs", "{x: 1}"],
            "unknown option",
        ),
        (["--model", "resnet20", "--batch-size", "0"], "must be positive"),
    ],
)
def test_cli_errors(argv, message, capsys):
    assert main(["profile", "--no-timing", "--no-memory", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cpu_attention_kernel_is_counted():
    """flop_counter alone counts the CPU SDPA kernel as zero; ours counts QK^T and PV."""

    class Attend(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=1.0)

    q = torch.randn(2, 1, 64, 8)
    assert count_flops(Attend(), q) == 2 * (2 * 2 * 64 * 64 * 8)
    csm = profile(ModelSpec("resnet20", "csm"), timing=False, memory=False)["rows"]
    # Stage 1 alone: 3 blocks x 2 products x (32*32)^2 positions x 16 channels.
    assert csm[1]["macs"] - csm[0]["macs"] > 3 * 2 * 1024**2 * 16


def test_out_of_memory_is_one_line_naming_the_attention(monkeypatch, capsys):
    """A CUDA out-of-memory error in the timed steps of the attention model (a stand-in,
    raised on the CPU) is one line naming it, the batch size and the fix."""
    real_train_step = profile_module._train_step

    def train_step(model, x, y):
        step = real_train_step(model, x, y)
        if count_params(model) == 269_722:  # the plain resnet20 runs as usual
            return step

        def out_of_memory() -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

        return out_of_memory

    monkeypatch.setattr(profile_module, "_train_step", train_step)
    argv = ["profile", "--model", "resnet20", "--attention", "se", "--no-memory"]
    argv += ["--batch-size", "4", "--input-size", "8", "--repeats", "1", "--device", "cpu"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "out of memory on cpu: resnet20 with attention se at batch size 4" in captured.err
    assert "(tried to allocate 1.50 GiB); try a smaller --batch-size" in captured.err
    assert "Traceback" not in captured.err


def test_profile_on_each_device(device):
    cuda = device.type == "cuda"
    result = profile(
        ModelSpec("resnet20", "se"),
        input_size=8,
        batch_size=4,
        repeats=2,
        memory=cuda,  # the CPU's fresh-process measurement has its own test
        device=device,
    )
    st = result["settings"]
    assert torch.device(st["device"]).type == device.type
    for row in result["rows"]:
        assert row["train_ms"] > 0 and row["infer_ms"] > 0
    text = format_profile(result)
    if cuda:
        assert all(row["peak_train_mib"] > 0 for row in result["rows"])
        assert "max_memory_allocated" in st["memory_source"]
        assert f"peak train MiB on {st['device']}: torch.cuda.max_memory_allocated" in text
        assert "\nGPU: " in text and "(CUDA events)" in text
    else:
        assert "GPU:" not in text and "memory_source" not in st
