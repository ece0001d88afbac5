"""Small data sets whole in memory: `load_arrays`, for studies, tests and notebooks.

Stages never call it: they read lazily through `unsupft.data.samples`, and memory then does not
grow with the data set. This is the same reading path (the same index, decoder and `fit`), only
gathered into one tensor, so keep it to sets that fit in memory comfortably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from unsupft.data.samples import Fitted, image_size_of, open_samples


@dataclass
class ArraySet:
    """A whole (small) data set in memory, in shard order."""

    uri: str
    keys: list[str]
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # long [N], None when unlabeled
    classes: list[str]


def load_arrays(uri: str, image_size: Sequence[int] | None = None) -> ArraySet:
    """Every sample of the data set at `uri` as tensors, fitted to `image_size` (default: the
    manifest's; data sets of mixed sizes need it)."""
    samples = open_samples(uri)
    size = image_size_of(samples, image_size, "pass image_size")
    return ArraySet(uri=samples.uri, keys=samples.keys(), images=Fitted(samples, size)[range(len(samples))],
                    labels=samples.labels, classes=list(samples.classes))
