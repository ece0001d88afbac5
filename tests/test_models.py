"""Backbones and their checkpoint formats (the model contract in docs/common brief)."""

from __future__ import annotations

import pytest
import torch

from unsupft import checkpoint
from unsupft.errors import UserError
from unsupft.models.features import extract_features
from unsupft.models import ARCHS, Preprocess, build_backbone, load, load_backbone, save_model
from unsupft._torchvision import torchvision
from unsupft.preprocess import fit, preprocess, to_input


@pytest.mark.parametrize("arch,dim", [("tiny", 128), ("resnet18", 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_shapes_and_torchvision_names(arch, dim, channels):
    model = build_backbone(arch, channels)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.out_dim == dim
    assert model(torch.randn(2, channels, 32, 32)).shape == (2, dim)
    keys = set(model.state_dict())
    assert "conv1.weight" in keys and "layer4.0.bn2.running_mean" in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_model_pt_round_trip_with_classifier(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("tiny", 1)
    fc = torch.nn.Linear(model.out_dim, 3)
    save_model(str(tmp_path / "model.pt"), model, "tiny", 1, (32, 32), classifier=fc, classes=["a", "b", "c"])
    loaded, meta = load_backbone(str(tmp_path))  # a stage output URI: finds model.pt inside
    assert meta["arch"] == "tiny" and meta["in_channels"] == 1 and meta["image_size"] == [32, 32]
    assert meta["classes"] == ["a", "b", "c"] and torch.equal(meta["classifier"]["weight"], fc.weight)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    raw = checkpoint.load(str(tmp_path / "model.pt"))
    tv = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])  # loads into torchvision code
    assert set(raw["backbone"]) <= set(tv.state_dict())


def test_torchvision_state_dict_with_fc_and_stem_adaptation(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    model, meta = load_backbone(str(tmp_path / "r18.pth"), in_channels=1)  # arch guessed from shapes
    assert meta["arch"] == "resnet18" and meta["format"] == "torchvision"
    assert torch.allclose(model.conv1.weight, tv.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, tv.layer3[0].conv1.weight)


def test_facebookresearch_moco_checkpoint(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    dim = tv.fc.in_features
    tv.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 128))
    state = {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in tv.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    model, meta = load_backbone(str(tmp_path / "moco.pth.tar"))
    assert meta["format"] == "moco" and meta["arch"] == "resnet18"
    assert torch.equal(model.conv1.weight, tv.conv1.weight)
    assert torch.equal(meta["head"]["2.weight"], tv.fc[2].weight)


def test_wrong_architecture_is_a_user_error(tmp_path):
    save_model(str(tmp_path / "model.pt"), build_backbone("tiny", 1), "tiny", 1, (32, 32))
    with pytest.raises(UserError, match="holds a tiny backbone, but resnet18"):
        load_backbone(str(tmp_path), arch="resnet18")
    torch.save(build_backbone("tiny", 3).state_dict(), tmp_path / "plain.pth")
    with pytest.raises(UserError, match="holds a tiny backbone"):  # guessed from the shapes
        load_backbone(str(tmp_path / "plain.pth"), arch="resnet18")
    partial = {k: v for k, v in build_backbone("resnet18", 3).state_dict().items() if not k.startswith("layer4.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="cannot tell the architecture"):
        load_backbone(str(tmp_path / "partial.pth"))
    with pytest.raises(UserError, match="do not fit a resnet18 backbone .*missing"):
        load_backbone(str(tmp_path / "partial.pth"), arch="resnet18")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no checkpoint there"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_backbone(str(tmp_path / "junk.pt"))


def test_images_at_another_size_reach_a_model_as_training_fits_them():
    """One resize path: `preprocess` (feature extraction, evaluation, prediction) and `load`'s
    preprocessing resize like the training view (`fit`: antialiased uint8, short side, centre crop),
    not by stretching a wide image to the model's square."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 20, 40), dtype=torch.uint8)  # wider, larger than the model's 12 x 12
    fitted = to_input(fit(images, (12, 12)))
    assert torch.equal(preprocess(images, (12, 12)), fitted)
    recorded = Preprocess.for_model(1, (12, 12))
    assert torch.equal(recorded(images), fitted)
    assert torch.equal(recorded(images[0]), fitted[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_models_load_gives_a_ready_model_and_its_preprocessing(arch, tmp_path):
    """`unsupft.models.load`: the classifier's logits, and features equal to the stages' own."""
    torch.manual_seed(0)
    backbone = build_backbone(arch, 1)
    for m in backbone.modules():  # eval-mode statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
    fc = torch.nn.Linear(backbone.out_dim, 3)
    save_model(str(tmp_path / "clf" / "model.pt"), backbone, arch, 1, (24, 24), classifier=fc, classes=["x", "y", "z"])
    save_model(str(tmp_path / "feat" / "model.pt"), backbone, arch, 1, (24, 24))
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)  # not the trained size: resized
    stage_features = extract_features(backbone, images, image_size=[24, 24])

    model, preprocess = load(str(tmp_path / "clf"))
    assert isinstance(model, torchvision.models.ResNet) and not model.training
    assert preprocess == Preprocess((0.449,), (0.226,), (24, 24), 1)
    assert model.classes == ["x", "y", "z"]
    with torch.no_grad():
        logits = model(preprocess(images))
        assert torch.allclose(logits, fc(stage_features), atol=1e-5)
        assert torch.allclose(model(preprocess(images[0]).unsqueeze(0)), logits[:1], atol=1e-5)  # one image
    features_model, _ = load(str(tmp_path / "feat" / "model.pt"))
    with torch.no_grad():
        assert torch.allclose(features_model(preprocess(images)), stage_features, atol=1e-5)
    raw = checkpoint.load(str(tmp_path / "clf" / "model.pt"))  # recorded for code outside unsupft
    assert raw["preprocess"] == {"mean": [0.449], "std": [0.226], "in_channels": 1, "image_size": [24, 24],
                                 "resize": "antialiased short side, centre crop"}
