"""Selective kernel (attnzoo/attention/sk.py) against a float64 reference written from the
SKNet paper's Eqs. 1-6, and in the ResNets whose 3x3 convs it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.attention.sk import SelectiveKernel
from attnzoo.measure import count_flops, count_params


def _bn(t: torch.Tensor, bn, training: bool, dims: tuple[int, ...]) -> torch.Tensor:
    """BatchNorm over ``dims`` (channel axis 1) by hand, float64."""
    shape = [1] * t.dim()
    shape[1] = -1
    if training:
        mean = t.mean(dim=dims, keepdim=True)
        var = ((t - mean) ** 2).mean(dim=dims, keepdim=True)
    else:
        mean = bn.running_mean.double().view(shape)
        var = bn.running_var.double().view(shape)
    return (t - mean) / torch.sqrt(var + bn.eps) * bn.weight.double().view(
        shape
    ) + bn.bias.double().view(shape)


def reference(x: torch.Tensor, m: SelectiveKernel, training: bool) -> torch.Tensor:
    branches = []
    for k, branch in zip(m.kernels, m.branches, strict=True):
        conv, bn = branch[0], branch[1]
        d = (k - 1) // 2  # a k x k receptive field from a 3x3 conv dilated by (k - 1) / 2
        u = F.conv2d(x, conv.weight.double(), None, m.stride, d, d, conv.groups)
        branches.append(torch.relu(_bn(u, bn, training, (0, 2, 3))))
    u = sum(branches)  # Eq. 1
    s = torch.stack(
        [u[:, c].sum(dim=(1, 2)) / (u.shape[2] * u.shape[3]) for c in range(u.shape[1])], 1
    )  # Eq. 2
    z = torch.einsum("dc,nc->nd", m.fuse[0].weight.double(), s)
    z = torch.relu(_bn(z, m.fuse[1], training, (0,)))  # Eq. 3
    a = torch.einsum("kd,nd->nk", m.select.weight.double(), z)  # A_m z, stacked (N, M*C)
    a = a.view(x.shape[0], len(m.kernels), -1)
    a = torch.exp(a) / torch.exp(a).sum(dim=1, keepdim=True)  # Eq. 5
    return sum(a[:, i, :, None, None] * branches[i] for i in range(len(m.kernels)))  # Eq. 6


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "out", "stride", "groups", "kernels"),
    [((2, 16, 7, 5), 16, 1, 1, (3, 5)), ((3, 8, 9, 8), 12, 2, 4, (3, 5)),
     ((2, 6, 5, 5), 6, 1, 2, (3, 5, 7))],
)  # fmt: skip
def test_matches_the_equations(mode, shape, out, stride, groups, kernels, randomize):
    torch.manual_seed(0)
    m = SelectiveKernel(
        shape[1], out, stride=stride, groups=groups, kernels=kernels, min_hidden=4
    ).double()
    randomize(m).train(mode == "train")
    x = torch.randn(*shape, dtype=torch.float64)
    expected = reference(x, m, mode == "train")
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    assert m(x).shape == (shape[0], out, -(-shape[2] // stride), -(-shape[3] // stride))


def test_branch_weights_are_a_softmax_over_branches():
    torch.manual_seed(0)
    m = SelectiveKernel(16, kernels=(3, 5, 7)).eval()
    maps = torch.stack([b(torch.randn(2, 16, 6, 6)) for b in m.branches], dim=1)
    a = m.branch_weights(maps)
    assert a.shape == (2, 3, 16, 1, 1)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 16, 1, 1))


def test_gradients_with_stride_and_groups(assert_gradients, randomize):
    torch.manual_seed(0)
    m = randomize(SelectiveKernel(8, 12, stride=2, groups=4, min_hidden=4).double()).train()
    m(torch.randn(3, 8, 7, 6, dtype=torch.float64)).square().sum().backward()
    assert_gradients(m, "sk")


def test_hidden_width_and_parameters():
    m = SelectiveKernel(64, groups=32)  # d = max(64 // 16, 32) = 32 (Eq. 4, L = 32)
    assert m.fuse[0].out_features == 32
    assert SelectiveKernel(1024, groups=32).fuse[0].out_features == 64
    # two grouped 3x3 convs 2 * 64 * 2 * 9, two BNs 2 * 128, W 64 * 32, BN 64, A 32 * 128
    assert count_params(m) == 2304 + 256 + 2048 + 64 + 4096


def test_sknet50_is_the_papers_27_5m_and_4_47_gflops():
    """SKNet-50 = ResNeXt-50 32x4d with SK[M=2, G=32, r=16] for its 3x3 convs: the SKNet
    paper's ImageNet table gives 27.5M parameters and 4.47 GFLOPs (multiply-adds)."""
    with torch.device("meta"):
        model = attnzoo.create_model("resnext50_32x4d", attention="sk")
        macs = count_flops(model, torch.empty(1, 3, 224, 224)) // 2
    assert count_params(model) == 27_479_784 and round(count_params(model) / 1e6, 1) == 27.5
    assert abs(macs / 4.47e9 - 1) < 0.005  # 4.463e9
    block = model.layer2[0]
    assert isinstance(block.conv2, SelectiveKernel) and isinstance(block.bn2, torch.nn.Identity)
    assert block.conv2.stride == 2 and block.conv2.branches[1][0].groups == 32


def test_replaces_the_first_conv_of_a_basic_block():
    model = attnzoo.create_model("resnet20", attention="sk")
    block = model.layer2[0]
    assert isinstance(block.conv1, SelectiveKernel) and block.conv1.stride == 2
    assert isinstance(block.bn1, torch.nn.Identity) and isinstance(
        block.attention, torch.nn.Identity
    )
    resnet18 = attnzoo.create_model("resnet18", attention="sk")
    assert isinstance(resnet18.layer3[0].conv1, SelectiveKernel)


def test_trains_in_a_resnet(losses_in_resnet20):
    losses = losses_in_resnet20("sk")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"kernels": (3,)}, "kernels"), ({"kernels": (3, 4)}, "kernels"),
     ({"reduction": 0}, "reduction"), ({"min_hidden": 0}, "min_hidden"),
     ({"groups": 3}, "groups=3 must divide"), ({"stride": 0}, "stride")],
)  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectiveKernel(16, **kwargs)


def test_backbones_that_cannot_take_it_say_so():
    with pytest.raises(ValueError, match="replaces a block's 3x3 convolution, which wrn16_8"):
        attnzoo.create_model("wrn16_8", attention="sk")
    with pytest.raises(ValueError, match="only goes in blocks"):
        attnzoo.create_model("resnet20", attention="sk", placement="stage")
    with pytest.raises(ValueError, match="stride of 'sk' are set by the backbone"):
        attnzoo.create_model("resnet20", attention="sk", attention_kwargs={"stride": 2})
    assert attnzoo.registry.attention_level("sk") == "conv"
    assert "sk" in attnzoo.list_attentions(level="conv")
