"""Today's in-memory path as the peer of benchmarks: decoded images held in one tensor, served
through the same `image(i)` interface the stages' lazy `Mixture` has."""

from __future__ import annotations

import torch


class TensorImages:
    """uint8 [N, C, H, W] in memory, read by index (what stages did before they streamed)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]
