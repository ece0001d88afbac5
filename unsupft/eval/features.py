"""Images in, features out: the one preprocessing every transfer and evaluation path shares.

Training (`unsupft.train.transfer`) and evaluation both go through `preprocess`, so a backbone
always sees images the same way: resized to the model's `image_size` (bilinear) when the data set
has another size, then normalised by `unsupft.data.augment.to_input` exactly as pretraining does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from unsupft.data.augment import to_input
from unsupft.data.samples import batches_of


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def preprocess(images: torch.Tensor, image_size: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] -> normalised float backbone input (resized to `image_size` if given)."""
    x = to_input(images)
    if image_size is not None and tuple(x.shape[-2:]) != tuple(int(s) for s in image_size):
        x = F.interpolate(x, size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Dataset | torch.Tensor,
    batch_size: int = 256,
    image_size: Sequence[int] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Pooled backbone features, float32 [N, D] on the CPU, taken in eval mode (BatchNorm uses its
    running statistics, so a sample's features do not depend on its batch).

    `images` are uint8 [N, C, H, W] in memory or a lazy view of same-sized images (`Fitted`), read
    batch by batch in DataLoader workers: only the features stay in memory. `image_size` is the size the backbone was trained at (the
    `image_size` of its model.pt meta), or None to keep the images' own size. The module's
    train/eval mode is restored afterwards.
    """
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        for batch in batches_of(images, batch_size):
            x = preprocess(batch, image_size).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                chunks.append(backbone(x).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, getattr(backbone, "out_dim", 0))
