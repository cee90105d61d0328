"""attnzoo.detection.fpn_backbone: attnzoo ResNets + FPN inside torchvision's Faster R-CNN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

import attnzoo
from attnzoo import detection
from attnzoo.detection import fpn_backbone, freeze_batch_norm

pytestmark = pytest.mark.usefixtures("one_thread")


def small_faster_rcnn(backbone: BackboneWithFPN) -> FasterRCNN:
    """Faster R-CNN with 3 classes, 64-96 px images and a small box head, for speed."""
    return FasterRCNN(
        backbone,
        min_size=64,
        max_size=96,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, 32),
        box_predictor=FastRCNNPredictor(32, 3),  # num_classes=3 (background + 2)
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
    )


def random_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 2.0, 50.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


def attention_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.backbone.body.named_parameters()
        if "attention" in n and p.requires_grad
    }


@pytest.mark.parametrize(
    ("name", "attention"),
    [
        ("resnet18", None),
        ("resnet18", "cbam"),
        ("resnet18", "coord"),
        ("resnet18", "bam"),
        ("resnet18", "bridge"),
        ("resnet18", "sk"),
        ("resnet50", "coord"),
    ],
)
def test_faster_rcnn_train_step_and_eval(name: str, attention: str | None) -> None:
    torch.manual_seed(0)
    model = small_faster_rcnn(fpn_backbone(name, attention=attention))
    model.train()
    images, targets = random_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())

    before = attention_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    if attention in ("cbam", "coord", "bam", "bridge"):
        assert before, "no trainable attention parameters"
        after = dict(model.backbone.body.named_parameters())
        changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
        assert changed, "the optimiser step changed no attention parameter"
    # The frozen stem (trainable_layers=3) did not move.
    assert not model.backbone.body.backbone.conv1.weight.requires_grad

    model.eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 64, 64), torch.rand(3, 80, 72)])
    assert len(detections) == 2
    for d in detections:
        n = d["boxes"].shape[0]
        assert (
            d["boxes"].shape == (n, 4) and d["labels"].shape == (n,) and d["scores"].shape == (n,)
        )


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])]
)
def test_feature_channels_and_strides(name: str, channels: list[int]) -> None:
    backbone = fpn_backbone(name, attention="cbam").eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        body = backbone.body(x)
        features = backbone(x)
    assert list(body) == ["0", "1", "2", "3"]
    assert [f.shape[1] for f in body.values()] == channels
    assert [f.shape[-1] for f in body.values()] == [32, 16, 8, 4]  # strides 4, 8, 16, 32
    assert list(features) == ["0", "1", "2", "3", "pool"]
    assert all(f.shape[1] == 256 == backbone.out_channels for f in features.values())
    assert [f.shape[-1] for f in features.values()] == [32, 16, 8, 4, 2]


def test_returned_layers_subset_leaves_no_unused_parameter() -> None:
    backbone = fpn_backbone("resnet18", attention="bam", returned_layers=(1, 2), trainable_layers=5)
    inner = backbone.body.backbone
    assert isinstance(inner.fc, nn.Identity)
    assert isinstance(inner.layer3, nn.Identity) and isinstance(inner.layer4, nn.Identity)
    bam = attnzoo.registry.attention_class("bam")
    # the boundary after layer2 belongs to the layer2 feature; the one after layer3 is dropped
    assert isinstance(inner.stage_attention[1], bam)
    assert isinstance(inner.stage_attention[2], nn.Identity)
    features = backbone(torch.randn(2, 3, 64, 64))
    assert list(features) == ["0", "1", "pool"]
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4]
    sum(f.sum() for f in features.values()).backward()
    unused = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_stage_attention_is_applied() -> None:
    """BAM sits in stage_attention, after the stages; the features must include it."""
    torch.manual_seed(0)
    backbone = fpn_backbone("resnet18", attention="bam").eval()
    inner = backbone.body.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = inner.maxpool(inner.relu(inner.bn1(inner.conv1(x))))
        layer1 = inner.layer1(stem)
        expected = inner.stage_attention[0](layer1)
        got = backbone.body(x)["0"]
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, layer1)


def test_final_attention_is_applied() -> None:
    backbone = fpn_backbone("resnet18", attention="cbam", placement="final").eval()
    inner = backbone.body.backbone
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = inner.maxpool(inner.relu(inner.bn1(inner.conv1(x))))
        last = inner.layer4(inner.layer3(inner.layer2(inner.layer1(stem))))
        assert torch.allclose(backbone.body(x)["3"], inner.final_attention(last))


def test_trainable_layers() -> None:
    for k in range(6):
        inner = fpn_backbone("resnet18", attention="bam", trainable_layers=k).body.backbone
        grads = {n: p.requires_grad for n, p in inner.named_parameters()}
        stages = ["layer4", "layer3", "layer2", "layer1"][:k]
        for n, trains in grads.items():
            if n.startswith("layer"):
                assert trains == (n.split(".")[0] in stages), n
            elif n.startswith("stage_attention."):
                assert trains == (f"layer{int(n.split('.')[1]) + 1}" in stages), n
            else:  # the stem: conv1 and bn1 train only with k=5
                assert n.split(".")[0] in ("conv1", "bn1") and trains == (k == 5), n


def test_frozen_batch_norm() -> None:
    backbone = fpn_backbone("resnet18", attention="coord")
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    frozen = fpn_backbone("resnet18", attention="coord", norm_layer=FrozenBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    coord = frozen.body.backbone.layer1[0].attention
    assert isinstance(coord.bn1, FrozenBatchNorm2d)  # attention modules' BN too


def test_freeze_batch_norm_keeps_outputs() -> None:
    torch.manual_seed(0)
    model = attnzoo.create_model("resnet18", attention="cbam", num_classes=4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = freeze_batch_norm(model)(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_pretrained_is_passed_through_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = detection.create_model

    def spy(name, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop("pretrained", None)
        return real(name, **kwargs)

    monkeypatch.setattr(detection, "create_model", spy)
    plain = fpn_backbone("resnet18")
    assert "pretrained" not in calls[-1]
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    weights = fpn_backbone("resnet18", attention="se", pretrained="some-weights")
    assert calls[-1]["pretrained"] == "some-weights" and calls[-1]["attention"] == "se"
    # torchvision's convention: a pretrained backbone gets frozen BN by default
    assert not any(isinstance(m, nn.BatchNorm2d) for m in weights.modules())


def test_pretrained_state_dict_file(tmp_path: Path) -> None:
    """A real load through create_model(pretrained=...): a plain ResNet-18 state_dict."""
    torch.manual_seed(0)
    plain = attnzoo.create_model("resnet18")
    with torch.no_grad():
        plain.bn1.running_mean.uniform_(-1.0, 1.0)
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    backbone = fpn_backbone("resnet18", attention="cbam", pretrained=str(path))
    inner = backbone.body.backbone
    assert torch.equal(inner.conv1.weight, plain.conv1.weight)
    assert isinstance(inner.bn1, FrozenBatchNorm2d)
    assert torch.equal(inner.bn1.running_mean, plain.bn1.running_mean)
    assert isinstance(inner.layer1[0].attention, attnzoo.registry.attention_class("cbam"))


def test_model_kwargs_reach_create_model() -> None:
    backbone = fpn_backbone(
        "resnet18", attention="se", attention_kwargs={"reduction": 4}, out_channels=64
    )
    assert backbone.body.backbone.layer1[0].attention.fc1.out_channels == 16
    assert backbone.out_channels == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet20"}, "ImageNet-style ResNets.*choose one of: .*resnet18"),
        ({"name": "densenet_bc_100_12"}, "ImageNet-style ResNets"),
        ({"name": "resnet19"}, "choose one of"),
        ({"attention": "abn"}, "model-level"),
        ({"attention": "bridge_head"}, "model-level"),
        ({"attention": "hamm"}, "unknown attention 'hamm'"),
        ({"trainable_layers": 6}, "trainable_layers must be an int in 0..5"),
        ({"trainable_layers": -1}, "trainable_layers"),
        ({"trainable_layers": 2.0}, "trainable_layers"),
        ({"returned_layers": (0, 1)}, "returned_layers"),
        ({"returned_layers": (3, 2)}, "returned_layers"),
        ({"returned_layers": ()}, "returned_layers"),
        ({"returned_layers": (5,)}, "returned_layers"),
        ({"norm_layer": nn.GroupNorm}, "norm_layer must be"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    kwargs = {"name": "resnet18", **kwargs}
    with pytest.raises(ValueError, match=match):
        fpn_backbone(**kwargs)


def test_exported_as_attribute() -> None:
    assert attnzoo.detection.fpn_backbone is fpn_backbone
