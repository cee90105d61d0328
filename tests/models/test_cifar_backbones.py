"""WRN-16-8, ResNeXt-29 (8x64d) and DenseNet-BC-100-12: exact parameter counts, where the
attention module sits, placements, model- and block-level attention, bad options.

These models are big (ResNeXt-29 has 34M parameters): parameter counts and structure checks
build on the meta device (no memory, no init cost); forward passes use batches of two at
32x32 (16x16 for ResNeXt with attention).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.models.densenet import DenseBlock, DenseNetBC
from attnzoo.models.resnext_cifar import CifarResNeXt, ResNeXtBottleneck
from attnzoo.models.wide_resnet import PreActBlock, WideResNet
from attnzoo.registry import attention_class
from attnzoo.train.loss import main_logits, training_loss

MODELS = ("wrn16_8", "resnext29_8x64d", "densenet_bc_100_12")
# Output channels of the module in each block (DenseNet: one per dense block).
BLOCK_CHANNELS = {
    "wrn16_8": [128] * 2 + [256] * 2 + [512] * 2,
    "resnext29_8x64d": [256] * 3 + [512] * 3 + [1024] * 3,
    "densenet_bc_100_12": [216, 300, 342],
}
STAGE_CHANNELS = {
    "wrn16_8": [128, 256, 512],
    "resnext29_8x64d": [256, 512, 1024],
    "densenet_bc_100_12": [216, 300, 342],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small batches: one thread is about as fast, and steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return attnzoo.create_model(name, **kwargs)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The attention attribute of every block (DenseNet: of every dense block)."""
    kinds = (PreActBlock, ResNeXtBottleneck, DenseBlock)
    return [b.attention for b in model.modules() if isinstance(b, kinds)]


@pytest.fixture(scope="module")
def plain():
    """One plain model of each kind, real weights, built once."""
    torch.manual_seed(0)
    return {name: attnzoo.create_model(name) for name in MODELS}


def step(model: nn.Module, size: int = 32) -> torch.Tensor:
    """One forward/backward in training mode; every parameter gets a finite gradient."""
    model.train()
    out = model(torch.randn(2, 3, size, size))
    loss = training_loss(out, torch.tensor([0, 1]))
    loss.backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    return main_logits(out)


# --- parameter counts ------------------------------------------------------------------

# 10 classes. wrn16_8: 11.0M in Zagoruyko & Komodakis; HAM Table 4 lists 10.79M (option A).
# resnext29_8x64d: 34.4M in Xie et al.; HAM lists 33.81M. densenet: 0.8M in Huang et al.
PARAMS = {
    ("wrn16_8", "B"): 10_961_370,
    ("wrn16_8", "A"): 10_795_482,
    ("resnext29_8x64d", "B"): 34_426_698,
    ("resnext29_8x64d", "A"): 33_751_370,
}


def test_default_parameter_counts(plain):
    assert n_params(plain["wrn16_8"]) == PARAMS["wrn16_8", "B"]
    assert n_params(plain["resnext29_8x64d"]) == PARAMS["resnext29_8x64d", "B"]
    assert n_params(plain["densenet_bc_100_12"]) == 769_162


@pytest.mark.parametrize(("name", "shortcut"), list(PARAMS))
def test_shortcut_parameter_counts(name, shortcut):
    assert n_params(meta_model(name, shortcut=shortcut)) == PARAMS[name, shortcut]


def test_densenet_parameter_breakdown(plain):
    """50 C + 5,280 per dense layer reading C channels; see the module docstring."""
    model = plain["densenet_bc_100_12"]
    layers = [24 + 12 * i for i in range(16)], [108 + 12 * i for i in range(16)]
    layers += ([150 + 12 * i for i in range(16)],)
    dense = sum(50 * c + 5_280 for block in layers for c in block)
    transitions = (2 * 216 + 216 * 108) + (2 * 300 + 300 * 150)
    assert dense == 175_680 + 242_880 + 276_480
    assert n_params(model) == 648 + dense + transitions + 2 * 342 + 342 * 10 + 10


@pytest.mark.parametrize(
    ("name", "kwargs", "extra"),
    [
        ("wrn16_8", {"attention": "se"}, 87_920),  # HAM: 10.79M -> 10.87M
        ("wrn16_8", {"attention": "cbam"}, 88_520),
        ("wrn16_8", {"attention": "eca"}, 30),
        ("resnext29_8x64d", {"attention": "se"}, 521_808),  # HAM: 33.81M -> 34.32M
        ("resnext29_8x64d", {"attention": "ham"}, 963),
        ("densenet_bc_100_12", {"attention": "se"}, 31_690),
        ("densenet_bc_100_12", {"num_classes": 100}, 90 * 343),
    ],
)
def test_attention_and_class_parameter_counts(plain, name, kwargs, extra):
    assert n_params(meta_model(name, **kwargs)) == n_params(plain[name]) + extra


# --- where the module goes -------------------------------------------------------------


@pytest.mark.parametrize("attention", attnzoo.list_attentions(level="module"))
@pytest.mark.parametrize("name", MODELS)
def test_every_module_level_attention_goes_in_every_block(name, attention):
    model = meta_model(name, attention=attention, placement="block")
    modules = block_modules(model)
    assert all(isinstance(m, attention_class(attention)) for m in modules)
    assert [m.channels for m in modules] == BLOCK_CHANNELS[name]


@pytest.mark.parametrize("name", MODELS)
def test_stage_and_final_placement(name):
    model = meta_model(name, attention="se", placement="stage")
    assert [m.channels for m in model.stage_attention] == STAGE_CHANNELS[name][:-1]
    assert all(isinstance(m, nn.Identity) for m in block_modules(model))
    model = meta_model(name, attention="se", placement="final")
    assert model.final_attention.channels == STAGE_CHANNELS[name][-1]
    assert model.stage_attention is None
    assert model.stage_channels == STAGE_CHANNELS[name]


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def zero(channels, earlier_channels=()):
    return Zero()


def test_wrn_attention_ends_the_residual_branch():
    """A module that zeroes the branch leaves the shortcut; option B projects the
    pre-activated input, option A and the identity read the block input."""
    x = torch.randn(2, 16, 8, 8)
    block = PreActBlock(16, 32, 2, "B", zero).eval()
    with torch.no_grad():
        pre = torch.relu(block.bn1(x))
        torch.testing.assert_close(block(x), block.shortcut(pre))
    block = PreActBlock(16, 32, 2, "A", zero).eval()
    torch.testing.assert_close(block(x)[:, :16], x[:, :, ::2, ::2])
    block = PreActBlock(16, 16, 1, "B", zero).eval()
    assert torch.equal(block(x), x)


def test_resnext_attention_sits_before_the_addition():
    block = ResNeXtBottleneck(64, 64, 1, 4, 4, "B", zero).eval()
    assert block.conv2.groups == 4 and block.conv2.out_channels == 16
    x = torch.randn(2, 64, 6, 6)
    assert torch.equal(block(x), torch.relu(x))


def test_resnext_group_widths():
    model = meta_model("resnext29_8x64d")
    widths = [b.conv2.out_channels for b in model.modules() if isinstance(b, ResNeXtBottleneck)]
    assert widths == [512] * 3 + [1024] * 3 + [2048] * 3
    assert {b.conv2.groups for b in model.modules() if isinstance(b, ResNeXtBottleneck)} == {8}


def test_densenet_attention_reads_the_whole_block_output():
    seen = []

    class Record(nn.Module):
        def forward(self, x):
            seen.append(x)
            return 2 * x

    block = DenseBlock(8, 3, 4, lambda c, earlier_channels=(): Record()).eval()
    x = torch.randn(2, 8, 5, 5)
    out = block(x)
    assert out.shape == (2, 8 + 3 * 4, 5, 5)
    assert torch.equal(seen[0][:, :8], x) and torch.equal(out, 2 * seen[0])


@pytest.mark.parametrize("name", ["wrn16_8", "densenet_bc_100_12"])
def test_final_attention_follows_the_final_bn_relu(name):
    model = attnzoo.create_model(name, attention="se", placement="final").eval()
    seen = []
    model.final_attention.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen[0].min() >= 0 and seen[0].shape[1] == STAGE_CHANNELS[name][-1]


# --- forward and backward --------------------------------------------------------------

CASES = [
    ("wrn16_8", None, "block", 32),
    ("wrn16_8", "se", "block", 32),
    ("wrn16_8", "cbam", "block", 16),
    ("wrn16_8", "cbam", "stage", 16),
    ("wrn16_8", "se", "final", 16),
    ("resnext29_8x64d", "se", "block", 16),
    ("resnext29_8x64d", "cbam", "stage", 16),
    ("densenet_bc_100_12", None, "block", 32),
    ("densenet_bc_100_12", "se", "block", 32),
    ("densenet_bc_100_12", "cbam", "block", 32),
    ("densenet_bc_100_12", "cbam", "stage", 32),
    ("densenet_bc_100_12", "eca", "final", 32),
]


@pytest.mark.parametrize(("name", "attention", "placement", "size"), CASES)
def test_forward_backward(name, attention, placement, size):
    torch.manual_seed(0)
    model = attnzoo.create_model(name, attention=attention, placement=placement)
    assert step(model, size).shape == (2, 10)


def test_resnext_plain_forward_backward(plain):
    model = plain["resnext29_8x64d"]
    assert step(model, 32).shape == (2, 10)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("name", "attention"),
    [
        ("wrn16_8", "abn"),
        ("wrn16_8", "bridge_head"),
        ("wrn16_8", "bridge"),
        ("resnext29_8x64d", "bridge"),
        ("densenet_bc_100_12", "abn"),
        ("densenet_bc_100_12", "bridge_head"),
    ],
)
def test_model_and_block_level_attention(name, attention):
    torch.manual_seed(0)
    model = attnzoo.create_model(name, attention=attention)
    assert step(model, 16).shape == (2, 10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_bridge_reads_the_blocks_earlier_outputs():
    wrn = meta_model("wrn16_8", attention="bridge")
    assert [m.earlier_channels for m in block_modules(wrn)][:3] == [(128,), (128,), (256,)]
    resnext = meta_model("resnext29_8x64d", attention="bridge")
    assert block_modules(resnext)[0].earlier_channels == (512, 512)


def test_resnext_abn_builds_on_meta():
    model = meta_model("resnext29_8x64d", attention="abn")
    assert model.branch[0].conv2.stride == (1, 1)


def test_make_stage_is_fresh_and_plain():
    wrn = meta_model("wrn16_8", attention="se")
    stage = wrn.make_stage(2, stride=1)
    assert isinstance(wrn, WideResNet) and stage[0].conv1.stride == (1, 1)
    assert all(isinstance(b.attention, nn.Identity) for b in stage)
    resnext = meta_model("resnext29_8x64d", attention="se")
    assert isinstance(resnext, CifarResNeXt)
    assert isinstance(resnext.make_stage(1, stride=2)[0].attention, nn.Identity)
    densenet = attnzoo.create_model("densenet_bc_100_12", attention="se")
    stage = densenet.make_stage(2, stride=1)
    assert isinstance(stage.block.attention, nn.Identity)
    assert stage(torch.randn(1, 300, 6, 6)).shape == (1, 342, 6, 6)
    with pytest.raises(ValueError, match="stage 1 of densenet_bc_100_12 takes stride 1"):
        densenet.make_stage(0, stride=2)


# --- bad options -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wrn16_8", "resnext29_8x64d"])
def test_bad_shortcut(name):
    with pytest.raises(ValueError, match="unknown shortcut 'C'; choose one of: A, B"):
        meta_model(name, shortcut="C")


@pytest.mark.parametrize("name", MODELS)
def test_bad_options(name):
    with pytest.raises(ValueError, match="unknown placement 'x'; choose one of: block, stage"):
        meta_model(name, attention="se", placement="x")
    with pytest.raises(ValueError, match="unknown option"):
        meta_model(name, widen=3)
    with pytest.raises(ValueError, match=r"expects images shaped \(N, 3, H, W\)"):
        meta_model(name)(torch.randn(1, 1, 8, 8, device="meta"))


def test_densenet_refuses_bridge():
    with pytest.raises(ValueError, match="no residual blocks. Use a module-level attention"):
        attnzoo.create_model("densenet_bc_100_12", attention="bridge")


def test_bad_dropout_and_depth():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        meta_model("wrn16_8", dropout=1.5)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=15)
    with pytest.raises(ValueError, match="9n \\+ 2"):
        CifarResNeXt(depth=30)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        DenseNetBC(depth=99)


def test_wrn_dropout_sits_between_the_convs():
    model = meta_model("wrn16_8", dropout=0.3)
    block = model.layer1[0]
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.3
    assert n_params(model) == PARAMS["wrn16_8", "B"]


def test_num_classes_defaults_to_each_models_natural_value():
    """10 for the CIFAR models, 1000 for the ImageNet ones (timm's and torchvision's)."""
    from attnzoo.registry import default_num_classes

    imagenet = {"resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d"}
    imagenet |= {"mobilenet_v2", "wide_resnet18_1_5", "wide_resnet18_2"}
    for name in attnzoo.list_models():
        assert default_num_classes(name) == (1000 if name in imagenet else 10), name
    assert attnzoo.create_model("resnet50").fc.out_features == 1000
    assert attnzoo.create_model("resnet20").fc.out_features == 10
    assert attnzoo.create_model("resnet50", num_classes=7).fc.out_features == 7
