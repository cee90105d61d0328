"""MobileNetV2: torchvision parity (names, state_dict, outputs, parameter count), the module
in every inverted residual block, the stage views, the CIFAR stem, every attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.models.mobilenet import InvertedResidual, MobileNetV2, make_divisible
from attnzoo.registry import attention_class
from attnzoo.train.loss import main_logits, training_loss

torchvision = pytest.importorskip("torchvision")

# Output channels of features.1 ... features.17.
BLOCK_CHANNELS = [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3 + [320]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convolutions: one thread is faster, and steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: nn.Module) -> list[InvertedResidual]:
    return [m for m in model.modules() if isinstance(m, InvertedResidual)]


@pytest.fixture(scope="module")
def pair():
    """Ours and torchvision's, 1000 classes, ours loaded from torchvision's weights."""
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(num_classes=1000).eval()
    ours = attnzoo.create_model("mobilenet_v2", num_classes=1000).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


def test_parameter_count(pair):
    ours, reference = pair
    assert n_params(ours) == n_params(reference) == 3_504_872
    # The default is ImageNet's 1000 classes, as torchvision's; 10 classes lose 990 * 1281.
    assert n_params(attnzoo.create_model("mobilenet_v2")) == 3_504_872
    assert n_params(attnzoo.create_model("mobilenet_v2", num_classes=10)) == 3_504_872 - 990 * 1281


def test_same_names_and_shapes_as_torchvision(pair):
    ours, reference = pair
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == {k: v.shape for k, v in reference.state_dict().items()}
    assert list(mine) == list(reference.state_dict())


def test_same_outputs_as_torchvision(pair):
    ours, reference = pair
    # Non-trivial BN statistics so the comparison is not of identities.
    torch.manual_seed(1)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.forward_features(x), reference.features(x))
    # And the other way round.
    reference.load_state_dict(ours.state_dict(), strict=True)


def test_width_mult_matches_torchvision():
    ours = attnzoo.create_model("mobilenet_v2", num_classes=1000, width_mult=0.5)
    reference = torchvision.models.mobilenet_v2(width_mult=0.5)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert make_divisible(32 * 0.5) == 16 and make_divisible(0.35 * 16) == 8


@pytest.mark.parametrize("attention", attnzoo.list_attentions(level="module"))
def test_every_module_level_attention_in_every_block(attention):
    """Attention keys are the only additions; every block has one, on its output channels."""
    torch.manual_seed(0)
    model = attnzoo.create_model(
        "mobilenet_v2", num_classes=10, attention=attention, stem="cifar", placement="block"
    )
    assert len(blocks(model)) == 17
    assert all(isinstance(b.attention, attention_class(attention)) for b in blocks(model))
    assert [b.attention.channels for b in blocks(model)] == BLOCK_CHANNELS
    plain_keys = set(attnzoo.create_model("mobilenet_v2", num_classes=10).state_dict())
    extra = set(model.state_dict()) - plain_keys
    assert plain_keys <= set(model.state_dict())
    assert all(".attention." in k for k in extra)
    model.train()
    out = model(torch.randn(2, 3, 16, 16))
    training_loss(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_attention_sits_before_the_residual_addition():
    def zero(channels, earlier_channels=()):
        return Zero()

    x = torch.randn(2, 24, 6, 6)
    residual = InvertedResidual(24, 24, 1, 6, zero).eval()
    assert residual.use_res_connect and torch.equal(residual(x), x)
    plain = InvertedResidual(24, 32, 1, 6, zero).eval()
    assert not plain.use_res_connect and torch.count_nonzero(plain(x)) == 0


def test_stages_are_views_of_features():
    model = attnzoo.create_model("mobilenet_v2", num_classes=1000)
    assert model.stage_channels == [16, 24, 32, 96, 1280]
    assert model.stage_bounds == [(1, 2), (2, 4), (4, 7), (7, 14), (14, 19)]
    assert model.stage4[0] is model.features[7] and model.stages()[4][-1] is model.features[18]
    assert n_params(model) == 3_504_872  # the views add no parameters
    assert not any(k.startswith("stage") for k in model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), model.features(x))


@pytest.mark.parametrize(
    ("stem", "sizes"), [("imagenet", [32, 16, 8, 4, 2]), ("cifar", [32, 32, 16, 8, 4])]
)
def test_stem_resolutions(stem, sizes):
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, stem=stem).eval()
    assert n_params(model) == 2_236_682
    with torch.no_grad():
        size = 64 if stem == "imagenet" else 32
        h = model.forward_stem(torch.randn(1, 3, size, size))
        seen = []
        for i in range(5):
            h = model.forward_stage(i, h)
            seen.append(h.shape[-2])
    assert seen == sizes
    assert (model.features[0][0].stride, model.features[2].stride) == (
        ((2, 2), 2) if stem == "imagenet" else ((1, 1), 1)
    )


@pytest.mark.parametrize(
    ("attention", "placement"),
    [(None, "block"), ("se", "block"), ("cbam", "stage"), ("se", "final"), ("bridge", "block")],
)
def test_forward_backward(attention, placement):
    torch.manual_seed(0)
    model = attnzoo.create_model(
        "mobilenet_v2", num_classes=10, attention=attention, placement=placement, stem="cifar"
    ).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    training_loss(out, torch.tensor([0, 1])).backward()
    for k, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k


def test_placement_stage_and_final():
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, attention="se", placement="stage")
    assert [m.channels for m in model.stage_attention] == [16, 24, 32, 96]
    assert all(isinstance(b.attention, nn.Identity) for b in blocks(model))
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, attention="se", placement="final")
    assert model.final_attention.channels == 1280


def test_bridge_reads_expansion_and_depthwise_outputs():
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, attention="bridge")
    earlier = [b.attention.earlier_channels for b in blocks(model)]
    assert earlier[0] == (32,) and earlier[1] == (96, 96) and earlier[-1] == (960, 960)


@pytest.mark.parametrize("attention", ["abn", "bridge_head"])
def test_model_level_attention(attention):
    torch.manual_seed(0)
    model = attnzoo.create_model(
        "mobilenet_v2", num_classes=10, attention=attention, stem="cifar"
    ).train()
    out = model(torch.randn(2, 3, 32, 32))
    training_loss(out, torch.tensor([0, 1])).backward()
    assert main_logits(out).shape == (2, 10)
    if attention == "abn":
        # The branch copies stage 5 at stride 1: the map stays at stage 4's 8x8.
        assert model.branch[0].stride == 1 and model.branch[-1][0].out_channels == 1280
        with torch.no_grad():
            maps = model.eval().forward_maps(torch.randn(1, 3, 32, 32))
        assert maps["attention_map"].shape[-2:] == (8, 8)


def test_make_stage_is_fresh_and_plain():
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, attention="se")
    stage = model.make_stage(2, stride=1)
    assert len(stage) == 3 and stage[0].stride == 1
    assert all(isinstance(b.attention, nn.Identity) for b in stage)
    assert stage[0] is not model.features[4]
    assert stage(torch.randn(1, 24, 8, 8)).shape == (1, 32, 8, 8)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown stem 'tiny'; choose one of: imagenet, cifar"):
        attnzoo.create_model("mobilenet_v2", num_classes=10, stem="tiny")
    with pytest.raises(ValueError, match="unknown placement 'x'; choose one of: block"):
        attnzoo.create_model("mobilenet_v2", num_classes=10, attention="se", placement="x")
    with pytest.raises(ValueError, match="width_mult must be positive"):
        MobileNetV2(width_mult=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MobileNetV2(dropout=1.0)
    with pytest.raises(ValueError, match="unknown option"):
        attnzoo.create_model("mobilenet_v2", num_classes=10, shortcut="B")
    with pytest.raises(ValueError, match=r"expects images shaped \(N, 3, H, W\)"):
        attnzoo.create_model("mobilenet_v2", num_classes=10)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        InvertedResidual(16, 16, 3, 6, lambda c, earlier_channels=(): nn.Identity())


def test_in_chans():
    model = attnzoo.create_model("mobilenet_v2", num_classes=10, in_chans=1, stem="cifar").eval()
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)
