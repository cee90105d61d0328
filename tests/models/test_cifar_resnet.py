"""CIFAR ResNets: exact parameter counts, shortcuts, placement of the module, bad input."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.models.cifar_resnet import BasicBlock
from attnzoo.models.common import PadShortcut

# He et al. 2016 (option A shortcuts), 10 classes, no attention.
PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet56": 853_018, "resnet110": 1_727_962}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", PARAMS.items())
def test_parameter_counts(name, expected):
    assert n_params(attnzoo.create_model(name)) == expected


def test_resnet44_and_classes():
    # 100 classes adds 90 * (64 + 1) parameters to the classifier.
    assert n_params(attnzoo.create_model("resnet20", num_classes=100)) == 269_722 + 90 * 65
    assert n_params(attnzoo.create_model("resnet44")) == 658_586


def test_shortcut_b_adds_projections():
    # Two projections: 16->32 and 32->64, each 1x1 conv + BN.
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(attnzoo.create_model("resnet20", shortcut="B")) == 269_722 + extra


def test_option_a_shortcut_is_strided_identity_with_zero_channels():
    x = torch.randn(2, 4, 6, 6)
    y = PadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 4:]) == 0


@pytest.mark.parametrize("attention", attnzoo.list_attentions(level=("module", "block")))
def test_every_attention_plugs_into_every_block(attention):
    model = attnzoo.create_model("resnet20", attention=attention, placement="block")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    cls = attnzoo.registry.attention_class(attention)
    assert all(isinstance(b.attention, cls) for b in blocks)
    # Module channels follow the stage widths.
    assert [b.attention.channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3


def test_attention_sits_before_the_addition():
    """A module that zeroes its input leaves only the shortcut: out = relu(shortcut(x))."""

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    block = BasicBlock(16, 16, 1, "A", lambda c, earlier_channels=(): Zero()).eval()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_bad_input():
    model = attnzoo.create_model("resnet20")
    with pytest.raises(ValueError, match=r"expects images shaped \(N, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown model 'resnet21'; choose one of: .*resnet110"):
        attnzoo.create_model("resnet21")
    with pytest.raises(ValueError, match="unknown shortcut 'C'"):
        attnzoo.create_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="unknown option"):
        attnzoo.create_model("resnet20", widen=2)
    with pytest.raises(ValueError, match="unknown attention 'hamm'; choose one of: a2, abn, bam, "):
        attnzoo.create_model("resnet20", attention="hamm")
    with pytest.raises(ValueError, match="separation_rate must be in"):
        attnzoo.create_model("resnet20", attention="ham", attention_kwargs={"separation_rate": 1.5})
    with pytest.raises(ValueError, match="num_classes"):
        attnzoo.create_model("resnet20", num_classes=0)


def test_in_chans():
    model = attnzoo.create_model("resnet20", in_chans=1)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)
