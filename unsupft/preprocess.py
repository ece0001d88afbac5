"""How a stored uint8 image becomes a backbone's input, the same way in every stage.

`fit` (antialiased resize of the short side, centre crop) takes a stored image to the size a model
was trained at (the `Fitted` view of training, finetuning, feature extraction and evaluation);
only MoCo's random resized crop goes from the stored image straight to the training size.
`to_input` then scales to [0, 1] and normalises with ImageNet's statistics (averaged for one
channel), as pretraining did; `preprocess` does both steps for a batch. There is no other resize:
images that reach `preprocess` at another size than the model's are fitted in uint8 exactly as the
`Fitted` view fits them for training, so a model never sees its evaluation images resized another
way than its training images.
"""

from __future__ import annotations

from typing import Sequence

import torch

import unsupft._torchvision  # noqa: F401  (must precede torchvision imports)
from torchvision.transforms.v2 import functional as TF

_MEAN = {3: (0.485, 0.456, 0.406), 1: (0.449,)}
_STD = {3: (0.229, 0.224, 0.225), 1: (0.226,)}


def fit(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize so the image covers `size` (H, W) keeping its aspect ratio, then centre-crop to it."""
    height, width = (int(s) for s in size)
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    resized = TF.resize(image, [max(height, round(h * scale)), max(width, round(w * scale))], antialias=True)
    return TF.center_crop(resized, [height, width])


def normalization(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the backbones' input: ImageNet's, averaged for 1 channel."""
    return _MEAN[channels], _STD[channels]


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., C, H, W] -> normalised float input of the backbones (ImageNet statistics)."""
    c = images.shape[-3]
    mean = torch.tensor(_MEAN[c], device=images.device).view(c, 1, 1)
    std = torch.tensor(_STD[c], device=images.device).view(c, 1, 1)
    return (images.float() / 255 - mean) / std


def preprocess(images: torch.Tensor, image_size: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> normalised float backbone input, first `fit` to `image_size` if given
    (what a saved model.pt records as its preprocessing)."""
    return to_input(fit(images, image_size) if image_size is not None else images)
