"""attnzoo.timm_layer: attnzoo's module-level attentions inside timm's ResNets."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.registry import attention_class, create_attention, list_attentions
from attnzoo.timm_layer import TimmAttentionLayer

timm = pytest.importorskip("timm")

# Output channels of each block of timm's resnet18 / resnet50 (where timm applies attn_layer).
BLOCK_CHANNELS = {
    "resnet18": [64] * 2 + [128] * 2 + [256] * 2 + [512] * 2,
    "resnet50": [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3,
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timm_resnet(arch: str, attn_layer: object = None) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=5, block_args=dict(attn_layer=attn_layer))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_params() -> dict[str, int]:
    return {arch: n_params(timm_resnet(arch)) for arch in BLOCK_CHANNELS}


def check_model(arch: str, name: str, base_params: dict[str, int], size: int) -> None:
    model = timm_resnet(arch, attnzoo.timm_layer(name))
    cls = attention_class(name)
    blocks = [
        b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage
    ]
    # timm puts the module in every block as ``block.se``, and nowhere else.
    assert all(isinstance(b.se, cls) for b in blocks)
    assert sum(isinstance(m, cls) for m in model.modules()) == len(blocks)
    # Parameters: timm's model plus exactly the attention modules' own.
    expected = sum(n_params(create_attention(name, c)) for c in BLOCK_CHANNELS[arch])
    assert n_params(model) == base_params[arch] + expected
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.layer4[-1].se.parameters())
    assert model.conv1.weight.grad is not None


@pytest.mark.parametrize("name", list_attentions(level="module"))
def test_every_module_attention_in_timm_resnet18(name: str, base_params: dict) -> None:
    check_model("resnet18", name, base_params, size=32)


@pytest.mark.parametrize("name", ["se", "eca", "cbam", "ham", "coord", "simam", "gc"])
def test_timm_resnet50(name: str, base_params: dict) -> None:
    check_model("resnet50", name, base_params, size=32)


def test_options_reach_the_module() -> None:
    model = timm_resnet("resnet18", attnzoo.timm_layer("se", reduction=4))
    assert model.layer1[0].se.fc1.out_channels == 16  # 64 / 4
    model = timm_resnet("resnet18", attnzoo.timm_layer("ham", separation_rate=0.5))
    assert model.layer1[0].se.spatial.important == 32  # C_im = 0.5 * 64 (default 0.6: 38)


def test_matches_create_attention() -> None:
    layer = attnzoo.timm_layer("cbam", reduction=8)
    torch.manual_seed(1)
    ours = layer(64)
    torch.manual_seed(1)
    reference = create_attention("cbam", 64, reduction=8)
    x = torch.randn(2, 64, 7, 5)
    assert torch.equal(ours(x), reference(x))


def test_picklable_deepcopy_and_repr() -> None:
    layer = attnzoo.timm_layer("ham", separation_rate=0.5)
    assert repr(layer) == "timm_layer('ham', separation_rate=0.5)"
    assert isinstance(layer, TimmAttentionLayer)
    for copied in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert copied == layer
        assert type(copied(64)) is type(layer(64))
    assert layer != attnzoo.timm_layer("ham")
    # A whole timm model holding it pickles too (the layer is not kept, only its modules).
    model = timm_resnet("resnet18", layer)
    pickle.loads(pickle.dumps(model))


def test_timm_keywords_device_dtype_act_layer() -> None:
    layer = attnzoo.timm_layer("coord")
    module = layer(32, device="cpu", dtype=torch.float64, act_layer=nn.SiLU)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    # act_layer is the host block's activation: ignored, the module keeps its paper's.
    plain = layer(32)
    assert [type(m) for m in module.modules()] == [type(m) for m in plain.modules()]


def test_rd_ratio_maps_to_reduction() -> None:
    module = attnzoo.timm_layer("se")(64, rd_ratio=0.25)
    assert module.fc1.out_channels == 16
    # an explicit reduction given to timm_layer wins over the block's rd_ratio
    module = attnzoo.timm_layer("se", reduction=8)(64, rd_ratio=0.25)
    assert module.fc1.out_channels == 8
    with pytest.raises(TypeError, match="no reduction"):
        attnzoo.timm_layer("eca")(64, rd_ratio=0.25)
    with pytest.raises(ValueError, match="rd_ratio must be a positive"):
        attnzoo.timm_layer("se")(64, rd_ratio=0)


def test_timm_csp_block_passes_act_layer_and_rd_ratio() -> None:
    """timm's CSPNet blocks call attn_layer(chs, act_layer=..., device=..., dtype=...), with
    rd_ratio bound by the config."""
    cspnet = pytest.importorskip("timm.models.cspnet")
    if not hasattr(cspnet, "_cs3_cfg"):
        pytest.skip("this timm has no cspnet._cs3_cfg")
    cfg = cspnet._cs3_cfg(
        width_multiplier=0.25,
        depth_multiplier=0.33,
        attn_layer=attnzoo.timm_layer("se"),
        attn_kwargs=dict(rd_ratio=0.25),
    )
    model = cspnet.CspNet(cfg, num_classes=3)
    modules = [m for m in model.modules() if isinstance(m, attention_class("se"))]
    assert modules and all(m.fc1.out_channels * 4 == m.fc1.in_channels for m in modules)
    model(torch.randn(1, 3, 64, 64)).sum().backward()


def test_efficientnet_style_probe_gets_type_error() -> None:
    """timm's EfficientNet builder probes attn_layer(8, rd_ratio=1.0) and catches TypeError."""
    attnzoo.timm_layer("se")(8, rd_ratio=1.0)
    with pytest.raises(TypeError):
        attnzoo.timm_layer("simam")(8, rd_ratio=1.0)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("hamm", "unknown attention 'hamm'; choose one of"),
        ("bridge", "block-level.*create_model"),
        ("sk", "conv-level.*create_model"),
        ("abn", "model-level.*create_model"),
        (None, "attn_layer=None"),
    ],
)
def test_refused_names(name: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attnzoo.timm_layer(name)


def test_unknown_options() -> None:
    with pytest.raises(ValueError, match="unknown option.*valid options"):
        attnzoo.timm_layer("se", rd_ratio=0.25)  # timm's name: give reduction here
    with pytest.raises(TypeError, match="unknown option.*gate_layer.*takes: "):
        attnzoo.timm_layer("se")(64, gate_layer="sigmoid")
