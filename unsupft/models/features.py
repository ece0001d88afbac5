"""Images in, features out: a backbone's pooled features of a data set, read batch by batch.

Training (`unsupft.train.transfer`), selection (ACKMeans) and evaluation all go through
`unsupft.preprocess.preprocess`, so a backbone always sees images the same way (fitted to the
model's `image_size`, normalised as in pretraining).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from unsupft.data.samples import batches_of
from unsupft.preprocess import preprocess


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Dataset | torch.Tensor, batch_size: int = 256,
                     image_size: Sequence[int] | None = None, device: torch.device | None = None) -> torch.Tensor:
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
