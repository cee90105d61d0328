"""``attnzoo.graft``: attention grafted into torchvision and timm networks (attnzoo/graft.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

import attnzoo
from attnzoo.attention.identity_init import IdentityBlend
from attnzoo.graft import _BLOCKS, BatchNormAttention, GraftSite, register_block, supported_blocks
from attnzoo.utils.random_weights import randomize_

timm = pytest.importorskip("timm")

TOLERANCE = 1e-5  # max |grafted - original logits| / max |original logits|; measured: 0

MODELS: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv_resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "tv_resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "tv_wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "tv_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "timm_resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm_resnet50": lambda: timm.create_model("resnet50", num_classes=10),
}
# modules inserted per placement: (block, stage, final)
COUNTS = {
    "tv_resnet18": (8, 3, 1),
    "tv_resnet50": (16, 3, 1),
    "tv_resnext50_32x4d": (16, 3, 1),
    "tv_wide_resnet50_2": (16, 3, 1),
    "tv_mobilenet_v2": (17, 4, 1),
    "timm_resnet18": (8, 3, 1),
    "timm_resnet50": (16, 3, 1),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(key: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_(MODELS[key]())  # random "pretrained" weights, BN statistics included


def _logits(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    torch.manual_seed(123)  # the same dropout mask (MobileNetV2's classifier) in both models
    with torch.no_grad():
        return model.train(train)(x)


def _check_preserved(
    key: str, attention: str, placement: str | None, modes=(False, True), **kwargs
) -> nn.Module:
    """Graft with the identity init; the logits equal the original's; the original
    state_dict loads with only the attention keys missing. Returns the grafted model."""
    model = _build(key)
    state = copy.deepcopy(model.state_dict())
    grafted = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    expected = [_logits(model, x, train) for train in modes]
    out = attnzoo.graft(grafted, attention, placement, attention_init="identity", **kwargs)
    assert out is grafted
    for train, want in zip(modes, expected, strict=True):
        got = _logits(grafted, x, train)
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error <= TOLERANCE, f"{attention} in {key} ({placement}, train={train}): {error}"
    missing, unexpected = grafted.load_state_dict(state, strict=False)
    assert unexpected == []
    # BatchNorm fills in an absent num_batches_tracked itself, so it is never reported missing
    new_keys = {k for k in set(grafted.state_dict()) - set(state) if "num_batches" not in k}
    assert set(missing) == new_keys and new_keys
    prefixes = tuple(f"{site.name}." for site in grafted.graft_report)
    assert all(k.startswith(prefixes) for k in missing)
    return grafted


@pytest.mark.parametrize("key", sorted(set(MODELS) - {"tv_wide_resnet50_2"}))
def test_identity_graft_preserves_every_model(key: str) -> None:
    grafted = _check_preserved(key, "cbam", "block")
    assert len(grafted.graft_report) == COUNTS[key][0]
    assert all(site.init == "blend" for site in grafted.graft_report)


def test_wide_resnet50_2() -> None:
    grafted = _check_preserved("tv_wide_resnet50_2", "gc", None, modes=(False,))
    assert len(grafted.graft_report) == 16
    assert {site.init for site in grafted.graft_report} == {"exact"}
    assert grafted.graft_report[0] == GraftSite("layer1.0.bn3.attention", 256, "exact")


@pytest.mark.parametrize("key", ["tv_resnet50", "tv_mobilenet_v2", "timm_resnet18"])
@pytest.mark.parametrize("placement", ["block", "stage", "final"])
def test_placements(key: str, placement: str) -> None:
    grafted = _check_preserved(key, "se", placement)
    count = COUNTS[key][("block", "stage", "final").index(placement)]
    assert len(grafted.graft_report) == count
    modules = [m for m in grafted.modules() if isinstance(m, IdentityBlend)]
    assert len(modules) == count


def test_sites_and_channels() -> None:
    resnet = attnzoo.graft(torchvision.models.resnet50(), "se", "stage")
    assert [(s.name, s.channels) for s in resnet.graft_report] == [
        ("layer1.attention", 256),
        ("layer2.attention", 512),
        ("layer3.attention", 1024),
    ]
    mobilenet = attnzoo.graft(torchvision.models.mobilenet_v2(), "se", "stage")
    assert [(s.name, s.channels) for s in mobilenet.graft_report] == [
        ("features.1_attention", 16),
        ("features.3_attention", 24),
        ("features.6_attention", 32),
        ("features.13_attention", 96),
    ]
    final = attnzoo.graft(torchvision.models.mobilenet_v2(), "se", "final")
    assert [(s.name, s.channels) for s in final.graft_report] == [("features.attention", 1280)]
    block = attnzoo.graft(torchvision.models.mobilenet_v2(), "se", "block")
    assert block.graft_report[0].name == "features.1.conv.2.attention"  # t = 1: no expansion
    assert block.graft_report[1].name == "features.2.conv.3.attention"
    assert isinstance(block.features[2].conv[3], BatchNormAttention)


def test_default_placement_is_the_attentions() -> None:
    model = attnzoo.graft(torchvision.models.resnet18(), "bam")  # bam: stage boundaries
    assert [s.name for s in model.graft_report] == [f"layer{i}.attention" for i in (1, 2, 3)]
    assert attnzoo.graft(torchvision.models.resnet18(), "eca").graft_report[0].name == (
        "layer1.0.bn2.attention"
    )


MODULE_LEVEL = attnzoo.list_attentions(level="module")


@pytest.mark.parametrize("attention", MODULE_LEVEL)
def test_every_module_level_attention(attention: str) -> None:
    """Each module-level attention, at its default placement, into MobileNetV2."""
    grafted = _check_preserved("tv_mobilenet_v2", attention, None)
    placement = attnzoo.registry.default_placement(attention)
    assert (
        len(grafted.graft_report)
        == COUNTS["tv_mobilenet_v2"][("block", "stage", "final").index(placement)]
    )


def test_default_init_changes_the_function() -> None:
    model = _build("tv_resnet18")
    x = torch.randn(2, 3, 64, 64)
    expected = _logits(model, x, False)
    attnzoo.graft(model, "cbam")
    assert all(site.init == "default" for site in model.graft_report)
    assert (_logits(model, x, False) - expected).abs().max() > 1e-2 * expected.abs().max()


def test_attention_kwargs_and_dtype() -> None:
    model = torchvision.models.resnet18().double()
    attnzoo.graft(model, "se", reduction=4)
    se = model.layer1[0].bn2.attention
    assert se.fc1.out_channels == 16
    assert se.fc1.weight.dtype == torch.float64
    model.eval()
    attnzoo.graft(model, "eca", "final")
    assert not model.layer4.attention.training


def test_training_step_reaches_the_attention() -> None:
    model = _build("tv_resnet18").train()
    attnzoo.graft(model, "cbam", attention_init="identity")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def step() -> dict[str, torch.Tensor]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if ".attention." in n}
        optimizer.step()
        return grads

    first = step()
    alphas = [g for n, g in first.items() if n.endswith("alpha")]
    assert len(alphas) == 8 and all(g.abs() > 0 for g in alphas)
    second = step()
    inner = [g for n, g in second.items() if n.endswith("mlp.2.weight")]
    assert len(inner) == 8 and all(g.abs().max() > 0 for g in inner)


def test_unknown_model() -> None:
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="does not recognise any block in Sequential.*ResNet"):
        attnzoo.graft(convs, "se")
    with pytest.raises(ValueError, match="block in SqueezeNet.*register_block"):
        attnzoo.graft(torchvision.models.squeezenet1_1(), "se")


def test_attnzoo_backbone_points_to_create_model() -> None:
    with pytest.raises(ValueError, match=r"create_model\('resnet20', attention='se'\)"):
        attnzoo.graft(attnzoo.create_model("resnet20"), "se")


@pytest.mark.parametrize(
    ("attention", "placement", "kwargs", "match"),
    [
        ("sea", None, {}, "unknown attention 'sea'; choose one of: a2, abn"),
        ("se", "everywhere", {}, "unknown placement 'everywhere'; choose one of: block"),
        ("se", None, {"ratio": 4}, "unknown option"),
        ("bridge", None, {}, "'bridge' is block-level"),
        ("sk", None, {}, "'sk' is conv-level"),
        ("abn", None, {}, "'abn' is model-level"),
        (None, None, {}, "graft needs an attention name"),
    ],
)
def test_errors(attention, placement, kwargs, match) -> None:
    model = torchvision.models.resnet18()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=match):
        attnzoo.graft(model, attention, placement, **kwargs)
    assert list(model.state_dict()) == keys  # unchanged on error
    assert not hasattr(model, "graft_report")


def test_unknown_attention_init() -> None:
    with pytest.raises(ValueError, match="unknown attention_init"):
        attnzoo.graft(torchvision.models.resnet18(), "se", attention_init="zeros")


def test_grafting_twice_is_refused() -> None:
    model = attnzoo.graft(torchvision.models.resnet18(), "se")
    with pytest.raises(ValueError, match="layer1.0.bn2 already has an attention"):
        attnzoo.graft(model, "eca")
    attnzoo.graft(model, "eca", "stage")  # other sites are free
    with pytest.raises(ValueError, match="already has an attention after it"):
        attnzoo.graft(model, "eca", "stage")


def test_register_block() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.norm(self.conv(x)))

    model = nn.Sequential(Block(), Block())
    register_block(Block, "norm")
    assert any(name.endswith("Block") for name in supported_blocks())
    attnzoo.graft(model, "eca")
    assert [s.name for s in model.graft_report] == ["0.norm.attention", "1.norm.attention"]
    assert model(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)
    _BLOCKS.pop(Block)  # leave the registry as it was


def test_identity_graft_of_a_class_without_identity_init() -> None:
    with pytest.raises(ValueError, match="'epsa' is conv-level"):
        attnzoo.graft(torchvision.models.resnet18(), "epsa", attention_init="identity")


@pytest.mark.parametrize("placement", ["block", "stage"])
def test_detection_backbone_with_frozen_batch_norm(placement):
    """torchvision's detection backbones use FrozenBatchNorm2d: graft attaches there too, the
    FPN features are unchanged with identity init, and the old state_dict loads."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from attnzoo.graft import FrozenBatchNormAttention

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    )
    with torch.no_grad():
        for m in backbone.modules():  # random "pretrained" statistics: not 1/0/0/1
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    original = copy.deepcopy(backbone).eval()
    state = copy.deepcopy(backbone.state_dict())
    attnzoo.graft(backbone.body, "cbam", placement=placement, attention_init="identity")
    wrapped = [m for m in backbone.modules() if isinstance(m, FrozenBatchNormAttention)]
    assert len(wrapped) == (8 if placement == "block" else 0)
    assert len(backbone.body.graft_report) == (8 if placement == "block" else 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = original(x), backbone.eval()(x)
    assert expected.keys() == got.keys()
    for key in expected:
        scale = float(expected[key].abs().max())
        assert float((got[key] - expected[key]).abs().max()) <= TOLERANCE * scale, key
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    assert unexpected == [] and missing and all(".attention." in k for k in missing)
    # the attention trains: gradients reach it through the frozen norms
    backbone.train()
    sum(v.sum() for v in backbone(x).values()).backward()
    grads = [p.grad for n, p in backbone.named_parameters() if ".attention" in n]
    assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)
