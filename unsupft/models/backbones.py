"""Backbones: torchvision ResNets with the classifier removed, for 1- or 3-channel images.

Every backbone is a `torchvision.models.ResNet` whose `fc` is `nn.Identity()`, so its state_dict
uses torchvision's names and a `model.pt` backbone loads into torchvision code as it is. The
attribute `out_dim` is the size of the pooled feature vector.

- `resnet18` / `resnet50`: torchvision's ImageNet architecture (7x7 stride-2 stem and max-pool).
- `tiny`: a narrow ResNet for 28-32 px images. An ImageNet stem would shrink a 32 px image to 8 px
  before the first block, so the stem is a 3x3 stride-1 conv without max-pool (as in the CIFAR
  ResNets); one BasicBlock per stage at widths 16-32-64-128 keeps a training step on 2 CPU cores
  well under a second for a batch of 256.
"""

from __future__ import annotations

from torch import nn

from unsupft._torchvision import torchvision
from unsupft.errors import UserError

ResNet = torchvision.models.ResNet
BasicBlock = torchvision.models.resnet.BasicBlock
Bottleneck = torchvision.models.resnet.Bottleneck

ARCHS = ("tiny", "resnet18", "resnet50")
TINY_WIDTHS = (16, 32, 64, 128)


def _init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation, for the layers replaced after construction."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _tiny(in_channels: int) -> ResNet:
    # Built through ResNet's own `_make_layer` so the module tree and parameter names are
    # torchvision's; the wide default layers are replaced by narrow ones.
    model = ResNet(BasicBlock, [1, 1, 1, 1])
    w = TINY_WIDTHS
    model.conv1 = nn.Conv2d(in_channels, w[0], kernel_size=3, stride=1, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(w[0])
    model.maxpool = nn.Identity()
    model.inplanes = w[0]
    model.layer1 = model._make_layer(BasicBlock, w[0], 1)
    model.layer2 = model._make_layer(BasicBlock, w[1], 1, stride=2)
    model.layer3 = model._make_layer(BasicBlock, w[2], 1, stride=2)
    model.layer4 = model._make_layer(BasicBlock, w[3], 1, stride=2)
    _init_weights(model)
    model.out_dim = w[3]
    return model


def build_backbone(arch: str, in_channels: int = 3) -> ResNet:
    """A randomly initialised backbone; `model(x)` returns `[N, model.out_dim]` features."""
    if arch == "tiny":
        model = _tiny(in_channels)
    elif arch in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, arch)(weights=None)
        model.out_dim = model.fc.in_features
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            _init_weights(model.conv1)
    else:
        raise UserError(f"unknown architecture '{arch}' (choose from {', '.join(ARCHS)})")
    model.fc = nn.Identity()
    model.arch = arch
    model.in_channels = in_channels
    return model


def guess_arch(state: dict) -> str | None:
    """The architecture a torchvision-named backbone state_dict belongs to, from its shapes."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        return None
    if conv1.shape[-1] == 3 and conv1.shape[0] == TINY_WIDTHS[0]:
        return "tiny"
    if "layer1.0.conv3.weight" in state:
        return "resnet50"
    if "layer1.1.conv1.weight" in state and "layer4.1.conv2.weight" in state:
        return "resnet18"
    return None
