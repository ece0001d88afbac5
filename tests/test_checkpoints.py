"""Checkpoints of the SSL ecosystem, built here from torchvision weights in each tool's layout.

Every stage loads `--init`/`--model` through `load_backbone` (transfer, evaluate, label) or
`init_moco` (pretrain, adapt, bn-adapt), so each family is checked through both, and through one
stage command end to end (the safe loader's refusal, the opt-in, the line saying what was loaded).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from unsupft._torchvision import torchvision
from unsupft.errors import UserError
from unsupft.models import load_backbone
from unsupft.models.io import describe
from unsupft.stages.moco_common import init_moco
from unsupft.stages.transfer import transfer_command
from unsupft.trust import TRUST_ENV


class SoloConfig:
    """Stands in for the omegaconf `DictConfig` solo-learn pickles into `hyper_parameters`."""

    def __init__(self) -> None:
        self.method, self.backbone = "mocov2plus", {"name": "resnet18"}


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for m in model.modules():  # non-trivial BatchNorm state, so statistics are compared too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _lightning(state: dict[str, torch.Tensor], **extra) -> dict:
    return {"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.1.0", "state_dict": state,
            "optimizer_states": [], "lr_schedulers": [], **extra}


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def write_lightly(model: nn.Module, path) -> None:
    """lightly's MoCo example: `backbone = nn.Sequential(*list(resnet.children())[:-1])`, a
    momentum copy and a projection head, in a Lightning checkpoint."""
    backbone = nn.Sequential(*list(model.children())[:-1])
    state = {**_prefixed("backbone.", backbone.state_dict()),
             **_prefixed("backbone_momentum.", {k: torch.zeros_like(v) for k, v in backbone.state_dict().items()}),
             "projection_head.layers.0.weight": torch.randn(512, 512),
             "projection_head.layers.2.weight": torch.randn(128, 512)}
    torch.save(_lightning(state, hyper_parameters={}), path)


def write_solo_learn(model: nn.Module, path) -> None:
    """solo-learn: `backbone.` (torchvision names, fc removed), `momentum_backbone.`, a projector,
    an online classifier, and its config object in `hyper_parameters`."""
    backbone = _backbone_state(model)
    state = {**_prefixed("backbone.", backbone),
             **_prefixed("momentum_backbone.", {k: torch.zeros_like(v) for k, v in backbone.items()}),
             "projector.0.weight": torch.randn(2048, 512), "classifier.weight": torch.randn(10, 512),
             "classifier.bias": torch.zeros(10)}
    torch.save(_lightning(state, hyper_parameters={"cfg": SoloConfig()}), path)


def write_timm(model: nn.Module, path) -> None:
    """timm's train.py `CheckpointSaver`: argparse options beside the state_dict."""
    torch.save({"epoch": 10, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": {},
                "version": 2, "args": argparse.Namespace(model="resnet18", lr=0.1), "metric": 71.2}, path)


def write_safetensors(model: nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_lightning_model(model: nn.Module, path) -> None:
    """A hand-written LightningModule holding `self.model = resnet18()`."""
    torch.save(_lightning(_prefixed("model.", model.state_dict())), path)


FAMILIES = {
    "lightly": (write_lightly, "model.ckpt", "lightly checkpoint", False),
    "solo-learn": (write_solo_learn, "solo.ckpt", "solo-learn checkpoint", True),
    "timm": (write_timm, "checkpoint-10.pth.tar", "timm checkpoint", True),
    "safetensors": (write_safetensors, "model.safetensors", "torchvision state_dict", False),
    "lightning": (write_lightning_model, "last.ckpt", "Lightning checkpoint (backbone under 'model.')", False),
}


def assert_same_backbone(loaded: nn.Module, model: nn.Module) -> None:
    expected = _backbone_state(model)
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_loader_gives_the_same_backbone(family, resnet18, tmp_path, monkeypatch, capsys):
    write, name, source, needs_trust = FAMILIES[family]
    path = str(tmp_path / name)
    write(resnet18, path)
    if needs_trust:
        monkeypatch.setenv(TRUST_ENV, "1")
    backbone, meta = load_backbone(path)  # transfer, evaluate, label
    assert meta["arch"] == "resnet18" and meta["source"] == source
    assert_same_backbone(backbone, resnet18)
    moco, arch, notes = init_moco(path, None, 3, dim=128, queue_size=16, temperature=0.2)  # pretrain, adapt, bn-adapt
    assert arch == "resnet18" and notes["head"] == "new"
    assert_same_backbone(moco.backbone, resnet18)
    line = capsys.readouterr().err.strip()
    expect_head = ", projection head not reused" if family in ("lightly", "solo-learn") else ""
    assert line == f"init: {source}, resnet18{expect_head}"


def test_two_backbones_or_none_are_one_line_errors(resnet18, tmp_path):
    """Two trained backbones (not a momentum copy) are ambiguous: say which prefixes, load none."""
    state = {**_prefixed("student.", resnet18.state_dict()), **_prefixed("backbone.", resnet18.state_dict())}
    torch.save(state, tmp_path / "two.pth")
    with pytest.raises(UserError, match="several ResNet backbones .*'student.'"):
        load_backbone(str(tmp_path / "two.pth"))
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "none.pth")
    with pytest.raises(UserError, match="no ResNet backbone weights found .*top-level keys: head."):
        load_backbone(str(tmp_path / "none.pth"))


@pytest.mark.parametrize("family,blocking", [("solo-learn", "tests.test_checkpoints.SoloConfig"),
                                             ("timm", "argparse.Namespace")])
def test_safe_loader_names_the_blocking_type(family, blocking, resnet18, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    write, name, *_ = FAMILIES[family]
    write(resnet18, tmp_path / name)
    with pytest.raises(UserError) as refused:
        load_backbone(str(tmp_path / name))
    message = str(refused.value)
    assert blocking in message and "--trust-checkpoint" in message and TRUST_ENV in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory, ingest) -> str:
    root = tmp_path_factory.mktemp("digits")
    ingest("sklearn:digits", root / "d", "--limit", "60", "--seed", "0")
    return str(root / "d")


def test_transfer_refuses_then_trusts_a_solo_learn_file(resnet18, digits_train, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path = tmp_path / "solo.ckpt"
    write_solo_learn(resnet18, path)
    args = ["--init", str(path), "--train", digits_train, "--epochs", "1", "--batch-size", "32"]
    refused = CliRunner().invoke(transfer_command, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"error: {path}: the safe loader refuses this checkpoint: besides tensors it holds "
        f"tests.test_checkpoints.SoloConfig; if you trust the file, pass --trust-checkpoint "
        f"(or set {TRUST_ENV}=1), which lets the file run code while loading"]
    assert not (tmp_path / "refused").exists()

    trusted = CliRunner().invoke(transfer_command, [*args, "--trust-checkpoint", "--out", str(tmp_path / "ok")])
    assert trusted.exit_code == 0, trusted.output
    assert "init: solo-learn checkpoint, resnet18, projection head not used" in trusted.output
    assert (tmp_path / "ok" / "model.pt").exists()
    # the trust ended with the command: the next load in this process is safe again
    with pytest.raises(UserError, match="refuses"):
        load_backbone(str(path))


def test_describe_names_reuse_of_a_moco_head():
    meta = {"source": "facebookresearch/moco checkpoint", "arch": "resnet50", "head": {"0.weight": 1}}
    assert describe(meta, "loaded") == "facebookresearch/moco checkpoint, resnet50, projection head reused"
    assert describe(meta, "new") == "facebookresearch/moco checkpoint, resnet50, projection head not reused"
