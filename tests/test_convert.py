"""attnzoo.convert: official checkpoints into attnzoo ResNets.

The official state_dicts here are generated from the official code's naming and shapes
(written down below from each repository's model code, independently of the converter), with
random values. After conversion, the attnzoo model must compute what the official network
computes: a functional reference forward written from the official code's semantics (its own
layouts: Linear layers, the [max; mean] descriptors, BAM's 1 + sigmoid(M_c * M_s)) runs on the
official tensors and must equal the model's output in float64. timm's models are real.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.convert import (
    create_official_model,
    load_checkpoint,
    load_official,
    official_sources,
    set_eca_kernel_sizes,
    unwrap_state_dict,
)

DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


# --- official state_dicts ----------------------------------------------------------------


class Filler:
    """Random tensors from one seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def conv(self, sd: dict, key: str, *shape: int, bias: bool = False) -> None:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        sd[key + ".weight"] = self.randn(*shape, scale=(2.0 / fan_in) ** 0.5)
        if bias:
            sd[key + ".bias"] = self.randn(shape[0], scale=0.1)

    def bn(self, sd: dict, key: str, c: int) -> None:
        sd[key + ".weight"] = 1.0 + self.randn(c, scale=0.2)
        sd[key + ".bias"] = self.randn(c, scale=0.2)
        sd[key + ".running_mean"] = self.randn(c, scale=0.2)
        sd[key + ".running_var"] = 0.5 + torch.rand(c, generator=self.gen)
        sd[key + ".num_batches_tracked"] = torch.tensor(1000)


def official_resnet(depth: int, block_att=None, stage_att=None, num_classes: int = 1000, seed=0):
    """torchvision-layout keys, as every official ResNet here has them (Jongchan's
    ``ResidualNet``, ECANet's ``eca_resnet*``, triplet's ``ResidualNet``, timm)."""
    kind, layers = DEPTHS[depth]
    expansion = 4 if kind == "bottleneck" else 1
    fill = Filler(seed)
    sd: dict[str, torch.Tensor] = {}
    fill.conv(sd, "conv1", 64, 3, 7, 7)
    fill.bn(sd, "bn1", 64)
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        for j in range(layers[i]):
            p = f"layer{i + 1}.{j}."
            stride = 2 if i > 0 and j == 0 else 1
            out = planes * expansion
            if kind == "basic":
                fill.conv(sd, p + "conv1", planes, inplanes, 3, 3)
                fill.bn(sd, p + "bn1", planes)
                fill.conv(sd, p + "conv2", planes, planes, 3, 3)
                fill.bn(sd, p + "bn2", planes)
            else:
                fill.conv(sd, p + "conv1", planes, inplanes, 1, 1)
                fill.bn(sd, p + "bn1", planes)
                fill.conv(sd, p + "conv2", planes, planes, 3, 3)
                fill.bn(sd, p + "bn2", planes)
                fill.conv(sd, p + "conv3", out, planes, 1, 1)
                fill.bn(sd, p + "bn3", out)
            if stride != 1 or inplanes != out:
                fill.conv(sd, p + "downsample.0", out, inplanes, 1, 1)
                fill.bn(sd, p + "downsample.1", out)
            if block_att is not None:
                block_att(sd, fill, p, out, i)
            inplanes = out
        if stage_att is not None and i < 3:
            stage_att(sd, fill, i + 1, inplanes)
    sd["fc.weight"] = fill.randn(num_classes, inplanes, scale=0.05)
    sd["fc.bias"] = fill.randn(num_classes, scale=0.05)
    return sd


def cbam_keys(sd, fill, p, c, _stage):
    """Jongchan MODELS/cbam.py: ChannelGate.mlp = (Flatten, Linear, ReLU, Linear),
    SpatialGate.spatial = BasicConv(2, 1, 7): conv (no bias) + BN."""
    h = c // 16
    sd[p + "cbam.ChannelGate.mlp.1.weight"] = fill.randn(h, c, scale=c**-0.5)
    sd[p + "cbam.ChannelGate.mlp.1.bias"] = fill.randn(h, scale=0.1)
    sd[p + "cbam.ChannelGate.mlp.3.weight"] = fill.randn(c, h, scale=h**-0.5)
    sd[p + "cbam.ChannelGate.mlp.3.bias"] = fill.randn(c, scale=0.1)
    fill.conv(sd, p + "cbam.SpatialGate.spatial.conv", 1, 2, 7, 7)
    fill.bn(sd, p + "cbam.SpatialGate.spatial.bn", 1)


def bam_keys(sd, fill, index, c):
    """Jongchan MODELS/bam.py: bam{index}.channel_att.gate_c.* and spatial_att.gate_s.*."""
    h = c // 16
    g = f"bam{index}.channel_att.gate_c."
    sd[g + "gate_c_fc_0.weight"] = fill.randn(h, c, scale=c**-0.5)
    sd[g + "gate_c_fc_0.bias"] = fill.randn(h, scale=0.1)
    fill.bn(sd, g + "gate_c_bn_1", h)
    sd[g + "gate_c_fc_final.weight"] = fill.randn(c, h, scale=h**-0.5)
    sd[g + "gate_c_fc_final.bias"] = fill.randn(c, scale=0.1)
    s = f"bam{index}.spatial_att.gate_s."
    fill.conv(sd, s + "gate_s_conv_reduce0", h, c, 1, 1, bias=True)
    fill.bn(sd, s + "gate_s_bn_reduce0", h)
    for i in range(2):
        fill.conv(sd, s + f"gate_s_conv_di_{i}", h, h, 3, 3, bias=True)
        fill.bn(sd, s + f"gate_s_bn_di_{i}", h)
    fill.conv(sd, s + "gate_s_conv_final", 1, h, 1, 1, bias=True)


def eca_keys(kernel_sizes):
    """ECANet models/eca_module.py: eca.conv = Conv1d(1, 1, k_stage, bias=False)."""

    def add(sd, fill, p, c, stage):
        k = kernel_sizes[stage]
        sd[p + "eca.conv.weight"] = fill.randn(1, 1, k, scale=0.5)

    return add


def triplet_keys(kernel_size=7, naming="models"):
    """triplet-attention: MODELS/triplet_attention.py (ChannelGateH/ChannelGateW/SpatialGate,
    BasicConv ``spatial``) or the root triplet_attention.py (cw/hc/hw, BasicConv ``conv``)."""
    gates, inner = {
        "models": (("ChannelGateH", "ChannelGateW", "SpatialGate"), "spatial"),
        "root": (("cw", "hc", "hw"), "conv"),
    }[naming]

    def add(sd, fill, p, c, _stage):
        for gate in gates:
            fill.conv(
                sd, f"{p}triplet_attention.{gate}.{inner}.conv", 1, 2, kernel_size, kernel_size
            )
            fill.bn(sd, f"{p}triplet_attention.{gate}.{inner}.bn", 1)

    return add


# --- the official forward, functionally, from the official tensors -------------------------


def bn(x, sd, key):
    return F.batch_norm(
        x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
        sd[key + ".bias"], False, 0.0, 1e-5,
    )  # fmt: skip


def official_forward(sd, x, block_att=None, stage_att=None):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = F.max_pool2d(
        F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1
    )
    bottleneck = "layer1.0.conv3.weight" in sd
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in sd:
            p = f"layer{i}.{j}."
            stride = 2 if i > 1 and j == 0 else 1
            if bottleneck:
                out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
                out = F.relu(
                    bn(
                        F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1),
                        sd,
                        p + "bn2",
                    )
                )
                out = bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3")
            else:
                out = F.relu(
                    bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), sd, p + "bn1")
                )
                out = bn(F.conv2d(out, sd[p + "conv2.weight"], padding=1), sd, p + "bn2")
            if block_att is not None:
                out = block_att(out, sd, p)
            identity = x
            if p + "downsample.0.weight" in sd:
                identity = bn(
                    F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride),
                    sd,
                    p + "downsample.1",
                )
            x = F.relu(out + identity)
            j += 1
        if stage_att is not None and i < 4:
            x = stage_att(x, sd, i)
    return F.linear(x.mean(dim=(2, 3)), sd["fc.weight"], sd["fc.bias"])


def official_cbam(x, sd, p):
    """Jongchan's CBAM: sigmoid(mlp(avg) + mlp(max)), then the spatial gate on [max; mean]."""
    q = p + "cbam."

    def mlp(v):
        h = F.relu(
            F.linear(v, sd[q + "ChannelGate.mlp.1.weight"], sd[q + "ChannelGate.mlp.1.bias"])
        )
        return F.linear(h, sd[q + "ChannelGate.mlp.3.weight"], sd[q + "ChannelGate.mlp.3.bias"])

    x = x * torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))[:, :, None, None]
    pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
    conv = sd[q + "SpatialGate.spatial.conv.weight"]
    s = bn(F.conv2d(pooled, conv, padding=conv.shape[-1] // 2), sd, q + "SpatialGate.spatial.bn")
    return x * torch.sigmoid(s)


def official_bam(x, sd, index):
    """Jongchan's BAM: F * (1 + sigmoid(M_c * M_s))."""
    g = f"bam{index}.channel_att.gate_c."
    v = F.linear(x.mean(dim=(2, 3)), sd[g + "gate_c_fc_0.weight"], sd[g + "gate_c_fc_0.bias"])
    v = F.relu(bn(v, sd, g + "gate_c_bn_1"))
    mc = F.linear(v, sd[g + "gate_c_fc_final.weight"], sd[g + "gate_c_fc_final.bias"])
    s = f"bam{index}.spatial_att.gate_s."
    m = F.conv2d(x, sd[s + "gate_s_conv_reduce0.weight"], sd[s + "gate_s_conv_reduce0.bias"])
    m = F.relu(bn(m, sd, s + "gate_s_bn_reduce0"))
    for i in range(2):
        w, b = sd[s + f"gate_s_conv_di_{i}.weight"], sd[s + f"gate_s_conv_di_{i}.bias"]
        m = F.relu(bn(F.conv2d(m, w, b, padding=4, dilation=4), sd, s + f"gate_s_bn_di_{i}"))
    ms = F.conv2d(m, sd[s + "gate_s_conv_final.weight"], sd[s + "gate_s_conv_final.bias"])
    return x * (1 + torch.sigmoid(mc[:, :, None, None] * ms))


def official_eca(x, sd, p):
    w = sd[p + "eca.conv.weight"]
    y = F.conv1d(x.mean(dim=(2, 3))[:, None, :], w, padding=(w.shape[-1] - 1) // 2)
    return x * torch.sigmoid(y)[:, 0, :, None, None]


def official_triplet(naming="models"):
    gates, inner = {
        "models": (("ChannelGateH", "ChannelGateW", "SpatialGate"), "spatial"),
        "root": (("cw", "hc", "hw"), "conv"),
    }[naming]

    def gate(t, sd, key):
        pooled = torch.cat([t.amax(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)], dim=1)
        w = sd[f"{key}.{inner}.conv.weight"]
        s = bn(F.conv2d(pooled, w, padding=w.shape[-1] // 2), sd, f"{key}.{inner}.bn")
        return t * torch.sigmoid(s)

    def forward(x, sd, p):
        q = p + "triplet_attention."
        y1 = gate(x.permute(0, 2, 1, 3), sd, q + gates[0]).permute(0, 2, 1, 3)
        y2 = gate(x.permute(0, 3, 2, 1), sd, q + gates[1]).permute(0, 3, 2, 1)
        return (gate(x, sd, q + gates[2]) + y1 + y2) / 3

    return forward


def assert_equivalent(model, sd, block_att=None, stage_att=None, size=64):
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    model = model.double().eval()
    with torch.no_grad():
        ours = model(x)
        official = official_forward(sd, x, block_att, stage_att)
    assert ours.abs().max() > 1e-3  # not a degenerate comparison
    torch.testing.assert_close(ours, official, rtol=1e-9, atol=1e-9)


def wrap(sd):
    """As the official training scripts save it: DataParallel keys in a checkpoint dict."""
    return {"epoch": 100, "arch": "resnet", "state_dict": {"module." + k: v for k, v in sd.items()}}


def assert_fully_loaded(model, report):
    assert report.ok and not report.unexpected and not report.missing
    assert len(report.loaded) == len(model.state_dict())


# --- sources ----------------------------------------------------------------------------


def test_official_sources() -> None:
    sources = official_sources()
    assert set(sources) == {"jongchan", "ecanet", "triplet", "timm"}
    assert "Jongchan/attention-module" in sources["jongchan"]
    assert attnzoo.load_official is load_official


def test_jongchan_cbam_resnet18() -> None:
    sd = official_resnet(18, cbam_keys)
    model = attnzoo.create_model(
        "resnet18", attention="cbam", attention_kwargs={"bn_momentum": 0.01}
    )
    report = load_official(model, wrap(sd), "jongchan")
    assert_fully_loaded(model, report)
    assert not report.notes  # bn_momentum=0.01 as the official code
    att = model.layer2[1].attention
    official = sd["layer2.1.cbam.SpatialGate.spatial.conv.weight"]
    # The official descriptor is [max; mean], ours [mean; max]: channels swapped.
    assert torch.equal(att.spatial.conv.weight[:, 0], official[:, 1])
    assert torch.equal(att.spatial.conv.weight[:, 1], official[:, 0])
    assert torch.equal(att.mlp[0].weight[:, :, 0, 0], sd["layer2.1.cbam.ChannelGate.mlp.1.weight"])
    assert torch.equal(att.mlp[2].bias, sd["layer2.1.cbam.ChannelGate.mlp.3.bias"])
    assert torch.equal(
        att.spatial.bn.running_var, sd["layer2.1.cbam.SpatialGate.spatial.bn.running_var"]
    )
    assert any("swapped" in t for t in report.transformed)
    assert_equivalent(model, sd, official_cbam)


def test_jongchan_cbam_module_matches_official_reference() -> None:
    """One CBAM module after conversion against the official forward, float64."""
    sd = official_resnet(18, cbam_keys)
    model = attnzoo.create_model("resnet18", attention="cbam")
    load_official(model, sd, "jongchan")
    module = model.layer3[0].attention.double().eval()
    x = torch.randn(3, 256, 9, 7, dtype=torch.float64)
    expected = official_cbam(
        x, {k: v.double() for k, v in sd.items() if v.is_floating_point()}, "layer3.0."
    )
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_jongchan_cbam_into_max_mean_model_copies_unswapped() -> None:
    sd = official_resnet(18, cbam_keys)
    model = attnzoo.create_model(
        "resnet18", attention="cbam", attention_kwargs={"pool_order": "max_mean"}
    )
    report = load_official(model, sd, "jongchan")
    assert not any("swapped" in t for t in report.transformed)
    assert report.notes  # BN momentum differs from the official 0.01: a remark, not an error
    official = sd["layer1.0.cbam.SpatialGate.spatial.conv.weight"]
    assert torch.equal(model.layer1[0].attention.spatial.conv.weight, official)
    assert_equivalent(model, sd, official_cbam)


def test_jongchan_bam_resnet18() -> None:
    sd = official_resnet(18, stage_att=bam_keys)
    model = attnzoo.create_model(
        "resnet18", attention="bam", attention_kwargs={"combine": "product"}
    )
    report = load_official(model, wrap(sd), "jongchan")
    assert_fully_loaded(model, report)
    bam = model.stage_attention[2]
    assert torch.equal(bam.spatial[6].weight, sd["bam3.spatial_att.gate_s.gate_s_conv_di_1.weight"])
    assert torch.equal(
        bam.channel_mlp[1].running_mean, sd["bam3.channel_att.gate_c.gate_c_bn_1.running_mean"]
    )
    assert_equivalent(model, sd, stage_att=official_bam)


def test_jongchan_bam_needs_the_product_combine() -> None:
    sd = official_resnet(18, stage_att=bam_keys)
    model = attnzoo.create_model("resnet18", attention="bam")
    with pytest.raises(
        ValueError, match=r"(?s)combine='sum'.*attention_kwargs=\{'combine': 'product'\}"
    ):
        load_official(model, sd, "jongchan")
    report = load_official(model, sd, "jongchan", strict=False)  # loads, says why it differs
    assert any("combine" in p for p in report.problems) and len(report.loaded) == len(
        model.state_dict()
    )
    model = attnzoo.create_model(
        "resnet18", attention="bam", attention_kwargs={"combine": "product", "dilation": 2}
    )
    with pytest.raises(ValueError, match="dilation 4"):
        load_official(model, sd, "jongchan")


def test_jongchan_bam_needs_the_stage_placement() -> None:
    sd = official_resnet(18, stage_att=bam_keys)
    model = attnzoo.create_model(
        "resnet18", attention="bam", attention_kwargs={"combine": "product"}, placement="block"
    )
    with pytest.raises(
        ValueError, match=r"(?s)BAM after layer1.*placement='block'.*attention='bam'"
    ):
        load_official(model, sd, "jongchan")


def test_jongchan_plain_resnet() -> None:
    sd = official_resnet(18)
    model = attnzoo.create_model("resnet18")
    assert_fully_loaded(model, load_official(model, sd, "jongchan"))
    assert_equivalent(model, sd)


@pytest.mark.parametrize("naming", ["models", "root"])
@pytest.mark.parametrize("kernel_size", [7, 3])
def test_triplet_resnet18(naming: str, kernel_size: int) -> None:
    sd = official_resnet(18, triplet_keys(kernel_size, naming))
    model, report = create_official_model(wrap(sd), "triplet")
    kwargs = {"bn_momentum": 0.01} if kernel_size == 7 else {"kernel_size": 3, "bn_momentum": 0.01}
    assert report.create_model_call == (
        f"model = attnzoo.create_model('resnet18', attention='triplet', attention_kwargs={kwargs!r})"
    )
    assert_fully_loaded(model, report)
    gates = (
        ("ChannelGateH", "ChannelGateW", "SpatialGate")
        if naming == "models"
        else ("cw", "hc", "hw")
    )
    inner = "spatial" if naming == "models" else "conv"
    att = model.layer4[1].attention
    for ours, theirs in zip(
        ("channel_width", "channel_height", "height_width"), gates, strict=True
    ):
        official = sd[f"layer4.1.triplet_attention.{theirs}.{inner}.conv.weight"]
        assert torch.equal(getattr(att, ours).conv.weight, official)  # both [max; mean]
    assert_equivalent(model, sd, official_triplet(naming))


def test_triplet_into_mean_max_model_swaps() -> None:
    sd = official_resnet(18, triplet_keys())
    model = attnzoo.create_model(
        "resnet18", attention="triplet", attention_kwargs={"pool_order": "mean_max"}
    )
    report = load_official(model, sd, "triplet")
    assert len([t for t in report.transformed if "swapped" in t]) == 3 * 8
    official = sd["layer1.0.triplet_attention.ChannelGateH.spatial.conv.weight"]
    assert torch.equal(model.layer1[0].attention.channel_width.conv.weight[:, 0], official[:, 1])
    assert_equivalent(model, sd, official_triplet())


def test_ecanet_per_stage_kernels() -> None:
    """ECANet's released ResNet-18 is k3577: k = 3, 5, 7, 7 in layer1..layer4."""
    sd = official_resnet(18, eca_keys((3, 5, 7, 7)))
    model = attnzoo.create_model("resnet18", attention="eca")
    with pytest.raises(ValueError, match=re.escape("set_eca_kernel_sizes(model, (3, 5, 7, 7))")):
        load_official(model, wrap(sd), "ecanet")
    set_eca_kernel_sizes(model, (3, 5, 7, 7))
    assert_fully_loaded(model, load_official(model, wrap(sd), "ecanet"))
    assert torch.equal(model.layer3[1].attention.conv.weight, sd["layer3.1.eca.conv.weight"])
    assert_equivalent(model, sd, official_eca)
    built, report = create_official_model(sd, "ecanet")
    assert "set_eca_kernel_sizes(model, (3, 5, 7, 7))" in report.create_model_call
    assert [b.attention.kernel_size for b in built.layer4] == [7, 7]


def test_ecanet_code_default_k3_and_wrong_kernel_size() -> None:
    """The official code's default, k = 3 everywhere: kernel_size=3; a k = 5 model is refused
    with the shapes and the fix."""
    sd = official_resnet(18, eca_keys((3, 3, 3, 3)))
    model = attnzoo.create_model("resnet18", attention="eca", attention_kwargs={"kernel_size": 5})
    with pytest.raises(
        ValueError, match=r"(?s)\(1, 1, 5\).*\(1, 1, 3\).*attention_kwargs=\{'kernel_size': 3\}"
    ):
        load_official(model, sd, "ecanet")
    model = attnzoo.create_model("resnet18", attention="eca", attention_kwargs={"kernel_size": 3})
    assert_fully_loaded(model, load_official(model, sd, "ecanet"))
    assert_equivalent(model, sd, official_eca)


# --- the released ResNet-50s: every key, at the real shapes ------------------------------

RESNET50 = [
    ("jongchan", dict(block_att=cbam_keys), "resnet50', attention='cbam', attention_kwargs={'bn_momentum': 0.01})", official_cbam, None),
    ("jongchan", dict(stage_att=bam_keys), "resnet50', attention='bam', attention_kwargs={'combine': 'product'})", None, official_bam),
    ("ecanet", dict(block_att=eca_keys((3, 5, 5, 7))), "resnet50', attention='eca')\nattnzoo.convert.set_eca_kernel_sizes(model, (3, 5, 5, 7))", official_eca, None),
    ("triplet", dict(block_att=triplet_keys()), "resnet50', attention='triplet', attention_kwargs={'bn_momentum': 0.01})", official_triplet(), None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "keys", "call", "block_ref", "stage_ref"),
    RESNET50,
    ids=["cbam", "bam", "eca", "triplet"],
)
def test_released_resnet50(source, keys, call, block_ref, stage_ref) -> None:
    sd = official_resnet(50, **keys)
    model, report = create_official_model(wrap(sd), source)
    assert report.create_model_call == "model = attnzoo.create_model('" + call
    assert_fully_loaded(model, report)
    # The call the report (and docs/convert.md) gives builds the same model.
    scope = {"attnzoo": attnzoo}
    exec(report.create_model_call, scope)
    assert {k: v.shape for k, v in scope["model"].state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert_equivalent(model, sd, block_ref, stage_ref, size=32)


# --- timm: real models, equal outputs ----------------------------------------------------

TIMM = [
    ("resnet50", {}, "model = attnzoo.create_model('resnet50')"),
    ("seresnet50", {}, "model = attnzoo.create_model('resnet50', attention='se')"),
    ("seresnet18", {}, "model = attnzoo.create_model('resnet18', attention='se', attention_kwargs={'rd_rule': 'round8'})"),
    ("seresnext50_32x4d", {}, "model = attnzoo.create_model('resnext50_32x4d', attention='se')"),
    ("resnet18", {"block_args": {"attn_layer": "eca"}}, "model = attnzoo.create_model('resnet18', attention='eca')"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs", "call"), TIMM, ids=[t[0] + ("_eca" if t[1] else "") for t in TIMM]
)
def test_timm_outputs_equal(name: str, kwargs: dict, call: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # random BN statistics and affine terms, so that every key matters
        for key, value in reference.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", "bias")):
                value.normal_(0.0, 0.1)
            elif key.endswith("weight") and value.dim() == 1:
                value.normal_(1.0, 0.1)
    args, create_kwargs = _parse_call(call)
    model = attnzoo.create_model(*args, **create_kwargs)
    report = load_official(model, reference.state_dict(), "timm")
    assert report.create_model_call == call
    assert_fully_loaded(model, report)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, ours = reference(x), model(x)
    assert expected.std() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def _parse_call(call: str) -> tuple[tuple, dict]:
    """The arguments of the create_model call in ``call``."""
    scope = {"attnzoo": type("A", (), {"create_model": staticmethod(lambda *a, **k: (a, k))})}
    exec(call, scope)
    return scope["model"]


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ecaresnet50d", "deep-stem"),
        ("ecaresnet26t", "deep-stem"),
        ("resnet50d", "deep-stem"),
        ("ecaresnetlight", "avg-down"),
        ("gcresnet50t", "ByobNet"),
        ("legacy_seresnet18", "ceil_mode"),
        ("skresnet18", "does not map"),
    ],
)
def test_timm_refused_layouts(name: str, match: str) -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):  # keys and shapes only
        state = timm.create_model(name, pretrained=False).state_dict()
    model = attnzoo.create_model("resnet50", attention="eca")
    with pytest.raises(ValueError, match=f"{match}.*no attnzoo model matches"):
        load_official(model, state, "timm")


# --- refusals --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cbam18() -> dict[str, torch.Tensor]:
    return official_resnet(18, cbam_keys)


def test_refuses_wrong_attention(cbam18) -> None:
    model = attnzoo.create_model("resnet18", attention="se")
    with pytest.raises(
        ValueError,
        match=r"(?s)CBAM in every block, the model attention='se'.*create_model\('resnet18', attention='cbam'",
    ):
        load_official(model, cbam18, "jongchan")
    with pytest.raises(
        ValueError, match=r"(?s)no attention.*create_model\('resnet18', attention='cbam'"
    ):
        load_official(attnzoo.create_model("resnet18"), cbam18, "jongchan")


def test_refuses_wrong_depth(cbam18) -> None:
    model = attnzoo.create_model("resnet34", attention="cbam")
    with pytest.raises(
        ValueError,
        match=r"(?s)resnet18 \(BasicBlock 2-2-2-2.*the model a resnet34.*create_model\('resnet18'",
    ):
        load_official(model, cbam18, "jongchan")


def test_refuses_missing_keys(cbam18) -> None:
    sd = dict(cbam18)
    del sd["layer3.1.cbam.SpatialGate.spatial.bn.weight"]
    model = attnzoo.create_model("resnet18", attention="cbam")
    with pytest.raises(
        ValueError,
        match=r"(?s)lacks \(1\).*layer3\.1\.attention\.spatial\.bn\.weight \(checkpoint key 'layer3\.1\.cbam\.SpatialGate\.spatial\.bn\.weight'\)",
    ):
        load_official(model, sd, "jongchan")
    report = load_official(model, sd, "jongchan", strict=False)
    assert report.missing and len(report.loaded) == len(model.state_dict()) - 1


def test_refuses_extra_keys(cbam18) -> None:
    sd = dict(cbam18)
    sd["layer1.0.cbam.ChannelGate.mlp.5.weight"] = torch.zeros(4, 4)
    model = attnzoo.create_model("resnet18", attention="cbam")
    with pytest.raises(
        ValueError, match=r"(?s)no place for \(1\).*layer1\.0\.cbam\.ChannelGate\.mlp\.5\.weight"
    ):
        load_official(model, sd, "jongchan")


def test_refuses_wrong_shapes(cbam18) -> None:
    model = attnzoo.create_model("resnet18", attention="cbam", attention_kwargs={"reduction": 8})
    with pytest.raises(
        ValueError,
        match=r"(?s)layer1\.0\.attention\.mlp\.0\.weight: model \(8, 64, 1, 1\), checkpoint 'layer1\.0\.cbam\.ChannelGate\.mlp\.1\.weight' \(4, 64\)",
    ):
        load_official(model, cbam18, "jongchan")
    model = attnzoo.create_model("resnet18", attention="cbam", num_classes=10)
    with pytest.raises(ValueError, match="1000 classes, the model 10"):
        load_official(model, cbam18, "jongchan")


def test_refuses_wrong_source_and_unknown_source(cbam18) -> None:
    model = attnzoo.create_model("resnet18", attention="cbam")
    with pytest.raises(ValueError, match="look like source='jongchan'"):
        load_official(model, cbam18, "triplet")
    with pytest.raises(ValueError, match=r"unknown source 'cbam'; choose one of: .*jongchan"):
        load_official(model, cbam18, "cbam")


def test_refuses_non_resnet_models(cbam18) -> None:
    with pytest.raises(ValueError, match="attnzoo ResNets"):
        load_official(attnzoo.create_model("mobilenet_v2"), cbam18, "jongchan")


def test_strict_false_new_classifier(cbam18) -> None:
    sd = {k: v for k, v in cbam18.items() if not k.startswith("fc.")}
    model = attnzoo.create_model("resnet18", attention="cbam", num_classes=10)
    report = load_official(model, sd, "jongchan", strict=False)
    assert sorted(report.missing) == ["fc.bias", "fc.weight"] and not report.problems
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])


# --- checkpoint files ------------------------------------------------------------------


def test_checkpoint_file_wrapped_and_prefixed(tmp_path, cbam18) -> None:
    path = tmp_path / "RESNET18_CBAM.pth.tar"
    checkpoint = wrap(cbam18)
    checkpoint["best_prec1"] = torch.tensor(77.6)
    checkpoint["optimizer"] = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    torch.save(checkpoint, path)
    state = load_checkpoint(path)
    assert set(state) == set(cbam18)
    model = attnzoo.create_model("resnet18", attention="cbam")
    assert_fully_loaded(model, load_official(model, path, "jongchan"))  # a path works too
    legacy = tmp_path / "legacy.pth"  # the pre-1.6 format of the 2018-2020 checkpoints
    torch.save(checkpoint, legacy, _use_new_zipfile_serialization=False)
    assert set(load_checkpoint(legacy)) == set(cbam18)


def test_safetensors_file(tmp_path, cbam18) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in cbam18.items()}, str(path))
    assert set(load_checkpoint(path)) == set(cbam18)


UNPICKLED: list[str] = []


def _record() -> list[str]:
    UNPICKLED.append("ran")
    return UNPICKLED


class Payload:
    def __reduce__(self):
        return (_record, ())


@pytest.mark.parametrize(
    "payload", [Payload(), argparse.Namespace(lr=0.1)], ids=["reduce", "object"]
)
def test_refuses_arbitrary_pickles(tmp_path, payload) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": payload}, path)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(path)
    assert UNPICKLED == []


def test_unwrap_state_dict() -> None:
    t = torch.zeros(1)
    assert unwrap_state_dict({"model": {"module.a": t}, "epoch": 3}) == {"a": t}
    assert unwrap_state_dict({"module.a": t, "b": t}) == {"module.a": t, "b": t}  # not all prefixed
    with pytest.raises(ValueError, match="not tensors"):
        unwrap_state_dict({"a": t, "epoch": 3})
    with pytest.raises(ValueError, match="expected a state_dict"):
        unwrap_state_dict([t])
