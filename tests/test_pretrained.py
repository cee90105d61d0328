"""attnzoo.pretrained: ``create_model(..., pretrained=...)`` from torchvision, timm, files and
export directories.

No network: torchvision's loader finds a random-weights file under the exact name it expects
in a temporary ``TORCH_HOME`` (its download function is replaced by one that fails), and
timm's ``create_model(pretrained=True)`` is replaced by the same model with random weights.
With ``attention=None`` the attnzoo model must compute exactly what the source model does.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import attnzoo
from attnzoo.pretrained import TORCHVISION_MODELS, PretrainedReport

INPUT = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and BN statistics (default BN statistics would hide a mix-up)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                values = torch.rand(t.shape, generator=g) * 0.2
                t.copy_(values + 0.9 if name.endswith(("running_var", "bn1.weight")) else values)
    return model.eval()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.allclose(a(INPUT), b(INPUT), rtol=0, atol=1e-5)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty TORCH_HOME, and any download attempt fails as it would offline."""

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"test: no network for {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def tv_resnet18(offline: Path) -> torch.nn.Module:
    """A torchvision resnet18 with random weights, cached where torchvision looks for them."""
    model = randomise(torchvision.models.resnet18())
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    offline.mkdir(parents=True)
    torch.save(model.state_dict(), offline / weights.url.rsplit("/", 1)[-1])
    return model


# --- torchvision ------------------------------------------------------------------------------


def test_torchvision_weights_compute_what_torchvision_computes(tv_resnet18):
    model = attnzoo.create_model("resnet18", pretrained="torchvision")
    assert same_outputs(model, tv_resnet18)
    report = model.pretrained_report
    assert isinstance(report, PretrainedReport)
    assert report.missing_attention == [] and report.new_classifier == []
    assert len(report.loaded) == len(tv_resnet18.state_dict())
    assert "torchvision ResNet18_Weights.IMAGENET1K_V1" in str(report)


def test_torchvision_backbone_under_an_attention_with_a_new_head(tv_resnet18):
    model = attnzoo.create_model(
        "resnet18", attention="ham", num_classes=10, pretrained="torchvision"
    )
    report = model.pretrained_report
    assert report.new_classifier == ["fc.weight", "fc.bias"]
    assert (report.checkpoint_num_classes, report.num_classes) == (1000, 10)
    assert report.missing_attention and all(".attention." in k for k in report.missing_attention)
    ours, theirs = model.state_dict(), tv_resnet18.state_dict()
    for key, value in theirs.items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], value), key
    assert "new classifier (1000 -> 10 classes)" in str(report)


def test_torchvision_backbone_under_a_model_level_attention(tv_resnet18):
    model = attnzoo.create_model("resnet18", attention="bridge_head", pretrained="torchvision")
    report = model.pretrained_report
    assert report.new_classifier == []
    assert sorted(report.missing_attention) == ["bridge.bias", "bridge.weight"]
    assert torch.equal(model.backbone.conv1.weight, tv_resnet18.conv1.weight)


def test_torchvision_mobilenet_v2(offline):
    reference = randomise(torchvision.models.mobilenet_v2())
    weights = torchvision.models.get_model_weights("mobilenet_v2").DEFAULT
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / weights.url.rsplit("/", 1)[-1])
    model = attnzoo.create_model("mobilenet_v2", pretrained="torchvision")
    assert same_outputs(model, reference)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("resnet20", {}, "torchvision weights load into: " + ", ".join(TORCHVISION_MODELS)),
        ("densenet_bc_100_12", {}, "no torchvision weights have the layout"),
        ("resnet18", {"stem": "cifar"}, "drop stem='cifar'"),
        ("resnet18", {"bottleneck_stride": "1x1"}, "drop bottleneck_stride='1x1'"),
        ("resnet18", {"attention": "sk"}, "replaces the blocks' 3x3 convolutions"),
    ],
)
def test_torchvision_refuses_what_does_not_match(tv_resnet18, name, kwargs, message):
    with pytest.raises(ValueError, match="pretrained") as info:
        attnzoo.create_model(name, pretrained="torchvision", **kwargs)
    assert message in str(info.value)


def test_torchvision_offline_without_a_cache_says_where_the_file_goes(offline):
    with pytest.raises(RuntimeError, match=r"TORCH_HOME.*resnet34-b627a593\.pth|resnet34"):
        attnzoo.create_model("resnet34", pretrained="torchvision")


def test_a_corrupt_torchvision_cache_file_is_refused(offline):
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    offline.mkdir(parents=True)
    (offline / weights.url.rsplit("/", 1)[-1]).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="delete the cached resnet18-f37072fd.pth"):
        attnzoo.create_model("resnet18", pretrained="torchvision")


# --- timm -------------------------------------------------------------------------------------


@pytest.fixture
def timm_offline(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.nn.Module]:
    """timm.create_model(name, pretrained=True) gives the random-weights model instead of
    downloading; the models built are kept by name."""
    built: dict[str, torch.nn.Module] = {}
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        assert pretrained is True
        built[name] = randomise(real(name, pretrained=False, **kwargs))
        return built[name]

    monkeypatch.setattr(timm, "create_model", create_model)
    return built


def test_timm_resnet_computes_what_timm_computes(timm_offline):
    model = attnzoo.create_model("resnet18", pretrained="timm:resnet18.a1_in1k")
    assert same_outputs(model, timm_offline["resnet18.a1_in1k"])
    assert model.pretrained_report.source == "timm resnet18.a1_in1k"


def test_timm_backbone_under_an_attention(timm_offline):
    model = attnzoo.create_model(
        "resnet18", attention="cbam", num_classes=7, pretrained="timm:resnet18"
    )
    report = model.pretrained_report
    assert report.new_classifier == ["fc.weight", "fc.bias"]
    assert report.missing_attention
    assert torch.equal(
        model.layer4[1].conv2.weight, timm_offline["resnet18"].layer4[1].conv2.weight
    )


def test_timm_se_checkpoint_loads_into_se_and_refuses_another_attention(timm_offline):
    kwargs = {"attention_kwargs": {"rd_rule": "round8"}}
    model = attnzoo.create_model("resnet18", attention="se", pretrained="timm:seresnet18", **kwargs)
    assert same_outputs(model, timm_offline["seresnet18"])
    assert model.pretrained_report.missing_attention == []
    with pytest.raises(ValueError, match="attention='se'") as info:
        attnzoo.create_model("resnet18", attention="ham", pretrained="timm:seresnet18")
    assert "holds attention modules" in str(info.value)


@pytest.mark.parametrize(
    "source, message",
    [
        ("timm:resnet34", "holds a resnet34, not a resnet18"),
        ("timm:resnet18d", "deep-stem"),
        ("timm:no_such_model", "Unknown model"),
        ("timm:", "needs a timm model name"),
    ],
)
def test_timm_refusals(timm_offline, source, message):
    with pytest.raises(ValueError, match=message):
        attnzoo.create_model("resnet18", pretrained=source)


# --- files and directories --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_state_dict_files(tmp_path, suffix):
    reference = randomise(torchvision.models.resnet18(num_classes=10))
    path = tmp_path / f"weights{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif suffix == ".pth":  # a training script's checkpoint, DataParallel prefixes and all
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save(state, path)
    model = attnzoo.create_model("resnet18", pretrained=path)  # num_classes from the file
    assert model.num_classes == 10 and model.pretrained_report.new_classifier == []
    assert same_outputs(model, reference)
    model = attnzoo.create_model("resnet18", num_classes=3, pretrained=str(path))
    assert model.pretrained_report.new_classifier == ["fc.weight", "fc.bias"]


def test_a_headless_checkpoint_gets_a_new_classifier(tmp_path):
    state = randomise(torchvision.models.resnet18()).state_dict()
    path = tmp_path / "features.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(path))
    model = attnzoo.create_model("resnet18", pretrained=path)
    report = model.pretrained_report
    assert report.checkpoint_num_classes is None and report.num_classes == 1000
    assert report.new_classifier == ["fc.weight", "fc.bias"]
    assert "no classifier in the checkpoint" in str(report)


def make_export(directory: Path, trained: torch.nn.Module, config: dict) -> Path:
    directory.mkdir()
    save_file(
        {k: v.contiguous() for k, v in trained.state_dict().items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_export_directory(tmp_path):
    trained = randomise(attnzoo.create_model("resnet20", attention="se", num_classes=4))
    config = dict(
        model="resnet20", num_classes=4, attention="se", attention_kwargs={}, model_kwargs={}
    )
    export = make_export(tmp_path / "export", trained, config)
    model = attnzoo.create_model("resnet20", attention="se", pretrained=export)
    assert model.num_classes == 4 and same_outputs(model, trained)
    assert model.pretrained_report.missing_attention == []
    # The exported backbone under a fresh attention is refused: its SE tensors have no place.
    with pytest.raises(ValueError, match="exported as attnzoo.create_model"):
        attnzoo.create_model("resnet20", attention="eca", pretrained=export)
    with pytest.raises(ValueError, match=r"holds a resnet20, not a resnet32.*load_pretrained"):
        attnzoo.create_model("resnet32", attention="se", pretrained=export)
    with pytest.raises(ValueError, match="trained with shortcut='A'"):
        attnzoo.create_model("resnet20", attention="se", shortcut="B", pretrained=export)


def test_a_plain_export_is_a_backbone_for_an_attention(tmp_path):
    trained = randomise(attnzoo.create_model("resnet20", num_classes=4))
    config = dict(model="resnet20", num_classes=4, attention=None)
    export = make_export(tmp_path / "export", trained, config)
    model = attnzoo.create_model("resnet20", attention="eca", pretrained=export)
    assert model.pretrained_report.missing_attention
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


# --- errors -----------------------------------------------------------------------------------


def test_wrong_architecture(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(torchvision.models.resnet34().state_dict(), str(path))
    with pytest.raises(ValueError, match="checkpoint tensors the model has no place for"):
        attnzoo.create_model("resnet18", pretrained=path)
    with pytest.raises(ValueError, match="shape mismatches"):
        attnzoo.create_model("wide_resnet18_2", pretrained=torchvision_file(tmp_path))


def torchvision_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        attnzoo.create_model("resnet18", pretrained=tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="not an `attnzoo export` directory"):
        attnzoo.create_model("resnet18", pretrained=tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_file(tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    state = torchvision.models.resnet18().state_dict()
    save_file(state, str(whole)) if suffix == ".safetensors" else torch.save(state, whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut"):
        attnzoo.create_model("resnet18", pretrained=cut)


TRAPPED: list[str] = []


def _spring() -> None:
    TRAPPED.append("code ran")


class Trap:
    """Unpickling this would run ``_spring``."""

    def __reduce__(self):
        return (_spring, ())


def test_a_pickle_that_is_not_just_weights_is_refused(tmp_path):
    path = tmp_path / "trap.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "trap": Trap()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        attnzoo.create_model("resnet18", pretrained=path)
    assert TRAPPED == []


@pytest.mark.parametrize("source", ["imagenet", "", 3])
def test_unknown_source(source):
    with pytest.raises(ValueError, match="torchvision"):
        attnzoo.create_model("resnet18", pretrained=source)
