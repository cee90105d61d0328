"""ImageNet-style ResNets: torchvision parity, paper parameter counts, options, attention."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import attnzoo
import attnzoo.models.resnet  # noqa: F401  (registers the models)
from attnzoo.models.common import PadShortcut
from attnzoo.models.resnet import BasicBlock, Bottleneck

MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "wide_resnet18_1_5",
    "wide_resnet18_2",
    "resnext50_32x4d",
)
# No attention, 1000 classes, torchvision's stem and shortcuts.
PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
    "wide_resnet18_1_5": 25_901_896,
    "wide_resnet18_2": 45_693_032,
}
# GAM's structure that its parameter columns imply (see attnzoo/attention/gam.py).
GAM_EXACT = {"conv_bias": False, "out_bn": False}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are big for a test: on a shared 2-core machine two intra-op threads
    fighting other processes make the file several times slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(name: str, **kwargs) -> int:
    """Parameters of ``create_model(name, ...)``, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        return n_params(attnzoo.create_model(name, **kwargs))


def millions(n: int) -> float:
    return round(n / 1e6, 2)


# --- torchvision parity ------------------------------------------------------------------


def _randomise_batchnorm(model: nn.Module) -> None:
    """So that eval-mode BNs are not near-identities and a mix-up of layers would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.1 * torch.randn(c, generator=g)
            m.running_mean = 0.1 * torch.randn(c, generator=g)
            m.running_var = 0.5 + torch.rand(c, generator=g)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"]
)
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_outputs(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None)
    _randomise_batchnorm(reference)
    ours = attnzoo.create_model(name, num_classes=1000)
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert n_params(ours) == n_params(reference) == PARAMS[name]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["wide_resnet18_1_5", "wide_resnet18_2"])
def test_wide_parameter_counts(name):
    assert count(name, num_classes=1000) == PARAMS[name]


def test_widening_multiplies_every_width():
    with torch.device("meta"):
        model = attnzoo.create_model("wide_resnet18_1_5", num_classes=1000)
    assert model.conv1.out_channels == 96
    assert model.stage_channels == [96, 192, 384, 768]
    assert model.fc.in_features == 768
    assert count("wide_resnet18_2", num_classes=1000, stem="cifar") < PARAMS["wide_resnet18_2"]


# --- paper parameter counts ----------------------------------------------------------------

# HAM Tables 5-6 (STL-10): 10 classes, 3x3 stem without max-pool, option A shortcuts.
# Only the rows that match (see the docstring of attnzoo/models/resnet.py for the others).
HAM_ROWS = [
    ("resnet18", None, 11.00),
    ("resnet18", "se", 11.09),
    ("resnet18", "cbam", 11.09),
    ("resnet34", None, 21.11),
    ("resnet34", "se", 21.27),
    ("resnet34", "cbam", 21.27),
    ("wide_resnet18_2", "se", 44.32),
]


@pytest.mark.parametrize(("name", "attention", "paper"), HAM_ROWS)
def test_ham_stl10_rows(name, attention, paper):
    n = count(name, num_classes=10, attention=attention, stem="cifar", shortcut="A")
    assert millions(n) == paper


def test_exact_counts_in_the_ham_setting():
    kwargs = {"num_classes": 10, "stem": "cifar", "shortcut": "A"}
    assert count("resnet18", **kwargs) == 11_000_138
    assert count("resnet50", **kwargs) == 20_744_266  # HAM: 20.73M


# GAM Tables 2-3 (ImageNet-1K): torchvision's ResNets, 1000 classes.
GAM_IMAGENET_ROWS = [
    ("resnet18", None, {}, {}, 11.69),
    ("resnet18", "bam", {}, {"placement": "stage"}, 11.71),
    ("resnet18", "cbam", {}, {}, 11.78),
    ("resnet18", "triplet", {}, {}, 11.69),
    ("resnet18", "abn", {"map_kernel_size": 3}, {}, 21.61),
    ("resnet18", "gam", GAM_EXACT, {}, 16.04),
    ("resnet18", "gam", {**GAM_EXACT, "channel": False}, {}, 15.95),  # GAM (sp)
    ("resnet18", "gam", {"spatial": False}, {}, 11.78),  # GAM (ch)
    ("resnet50", None, {}, {}, 25.56),
    ("resnet50", "bam", {}, {"placement": "stage"}, 25.92),
    ("resnet50", "cbam", {}, {}, 28.09),
    ("resnet50", "triplet", {}, {}, 25.56),
    ("resnet50", "abn", {"map_kernel_size": 3}, {}, 43.58),
    ("resnet50", "gam", GAM_EXACT, {}, 151.32),
    ("resnet50", "gam", {**GAM_EXACT, "groups": 4}, {}, 58.90),
]
# GAM Table 1 (CIFAR-100): ResNet-50 with the 3x3 stem, option B shortcuts, 100 classes.
GAM_CIFAR_ROWS = [
    (None, {}, {}, 23.71),
    ("bam", {}, {"placement": "stage"}, 24.06),
    ("cbam", {}, {}, 26.24),
    ("gam", GAM_EXACT, {}, 149.47),
    ("gam", {**GAM_EXACT, "groups": 4}, {}, 57.05),
]


@pytest.mark.parametrize(
    ("name", "attention", "attention_kwargs", "kwargs", "paper"), GAM_IMAGENET_ROWS
)
def test_gam_imagenet_rows(name, attention, attention_kwargs, kwargs, paper):
    n = count(
        name, num_classes=1000, attention=attention, attention_kwargs=attention_kwargs, **kwargs
    )
    assert millions(n) == paper


@pytest.mark.parametrize(("attention", "attention_kwargs", "kwargs", "paper"), GAM_CIFAR_ROWS)
def test_gam_cifar100_rows(attention, attention_kwargs, kwargs, paper):
    n = count(
        "resnet50",
        num_classes=100,
        attention=attention,
        attention_kwargs=attention_kwargs,
        stem="cifar",
        **kwargs,
    )
    assert millions(n) == paper


def test_gam_cifar_row_needs_the_cifar_stem():
    kwargs = {"num_classes": 100, "attention": "gam", "attention_kwargs": GAM_EXACT}
    assert millions(count("resnet50", stem="imagenet", **kwargs)) == 149.48


# --- forward / backward ----------------------------------------------------------------------

CONFIGS = {
    "plain": {},
    "se": {"attention": "se"},
    "bridge": {"attention": "bridge"},
    "se-stage": {"attention": "se", "placement": "stage"},
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name, config):
    torch.manual_seed(0)
    model = attnzoo.create_model(name, num_classes=10, **CONFIGS[config]).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k


@pytest.mark.parametrize("attention", ["abn", "bridge_head"])
def test_model_level_attention(attention):
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet18", num_classes=10, attention=attention).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    if attention == "abn":
        perception, branch = out
        assert perception.shape == branch.shape == (2, 10)
        (perception.sum() + branch.sum()).backward()
        # The attention branch is a stride-1 copy of layer4: the map keeps layer3's size.
        assert model.forward_maps(x)["attention_map"].shape == (2, 1, 4, 4)
    else:
        assert out.shape == (2, 10)
        out.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_make_stage_is_a_fresh_stage_without_attention():
    model = attnzoo.create_model("resnet50", num_classes=10, attention="se")
    stage = model.make_stage(3, stride=1)
    assert stage[0].conv2.stride == (1, 1) and model.layer4[0].conv2.stride == (2, 2)
    assert all(isinstance(b.attention, nn.Identity) for b in stage)
    plain = attnzoo.create_model("resnet50", num_classes=10)
    assert n_params(stage) == n_params(plain.layer4)
    assert stage(torch.randn(1, 1024, 4, 4)).shape == (1, 2048, 4, 4)


# --- structure and options ------------------------------------------------------------------


def test_attention_is_identity_without_attention_and_in_every_block_with_it():
    plain = attnzoo.create_model("resnet34", num_classes=10)
    blocks = [m for m in plain.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 16 and all(isinstance(b.attention, nn.Identity) for b in blocks)
    se = attnzoo.create_model("resnet50", num_classes=10, attention="se")
    blocks = [m for m in se.modules() if isinstance(m, Bottleneck)]
    assert [b.attention.channels for b in blocks] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3


def test_bridge_reads_the_earlier_conv_outputs():
    basic = attnzoo.create_model("resnet18", num_classes=10, attention="bridge")
    assert basic.layer3[0].attention.earlier_channels == (256,)
    bottleneck = attnzoo.create_model("resnet50", num_classes=10, attention="bridge")
    assert bottleneck.layer3[0].attention.earlier_channels == (256, 256)
    assert bottleneck.layer3[0].attention.channels == 1024
    resnext = attnzoo.create_model("resnext50_32x4d", num_classes=10, attention="bridge")
    assert resnext.layer1[0].attention.earlier_channels == (128, 128)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_attention_sits_before_the_addition(block):
    """A module that zeroes its input leaves only the shortcut: out = relu(shortcut(x))."""
    b = block(64, 64 // block.expansion, 1, "B", lambda c, earlier_channels=(): _Zero()).eval()
    x = torch.randn(2, 64, 8, 8)
    assert b.downsample is None
    assert torch.equal(b(x), torch.relu(x))


def test_placement_stage():
    model = attnzoo.create_model("resnet50", num_classes=10, attention="bam", placement="stage")
    assert [m.channels for m in model.stage_attention] == [256, 512, 1024]
    assert all(isinstance(b.attention, nn.Identity) for b in model.layer1)


def test_shortcut_a_is_parameter_free():
    # B's projections: 64->128, 128->256, 256->512 (1x1 conv + BN).
    resnet18_b = sum(c * 2 * c + 2 * 2 * c for c in (64, 128, 256))
    assert count("resnet18", num_classes=10) - count("resnet18", shortcut="A", num_classes=10) == (
        resnet18_b
    )
    # ResNet-50 also projects 64->256 in layer1: 2,776,576 parameters in all.
    assert (
        count("resnet50", num_classes=10) - count("resnet50", shortcut="A", num_classes=10)
        == 2_776_576
    )
    model = attnzoo.create_model("resnet50", num_classes=10, shortcut="A")
    assert isinstance(model.layer1[0].downsample, PadShortcut)
    assert isinstance(model.layer2[0].downsample, PadShortcut)
    assert model.layer2[1].downsample is None
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_stems():
    x = torch.randn(2, 3, 32, 32)
    cifar = attnzoo.create_model("resnet18", num_classes=10, stem="cifar")
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    assert cifar.forward_features(x).shape == (2, 512, 4, 4)
    assert cifar(x).shape == (2, 10)
    imagenet = attnzoo.create_model("resnet18", num_classes=10)
    assert imagenet.forward_features(x).shape == (2, 512, 1, 1)
    # The stem's conv is 7x7 (9408 weights) or 3x3 (1728): nothing else changes.
    assert count("resnet18", num_classes=10) - count("resnet18", num_classes=10, stem="cifar") == (
        64 * 3 * (49 - 9)
    )


def test_in_chans():
    model = attnzoo.create_model("resnet18", num_classes=10, in_chans=1)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"expects images shaped \(N, 1, H, W\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="in_chans must be a positive int"):
        attnzoo.create_model("resnet18", in_chans=0)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown stem 'cifar10'; choose one of: imagenet, cifar"):
        attnzoo.create_model("resnet18", stem="cifar10")
    with pytest.raises(ValueError, match="unknown shortcut 'C'; choose one of: A, B"):
        attnzoo.create_model("resnet50", shortcut="C")
    with pytest.raises(ValueError, match="unknown placement 'everywhere'; choose one of: block"):
        attnzoo.create_model("resnet18", attention="se", placement="everywhere")
    with pytest.raises(ValueError, match="only goes in blocks"):
        attnzoo.create_model("resnet18", attention="bridge", placement="stage")
    with pytest.raises(ValueError, match="unknown option.*valid options: num_classes"):
        attnzoo.create_model("resnet18", widen=2)
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        attnzoo.create_model("resnet19")
