"""unsupft.models: backbones (torchvision ResNets), their checkpoint formats, and MoCo."""

from unsupft.models.backbones import ARCHS, build_backbone
from unsupft.models.io import Preprocess, load, load_backbone, save_model

__all__ = ["ARCHS", "Preprocess", "build_backbone", "load", "load_backbone", "save_model"]
