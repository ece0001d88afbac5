"""What MoCo, COIN and Bi-tuning share around a backbone: the projection head and the momentum
(EMA) update of a key encoder.

One update rule: the key encoder's *parameters* follow the online ones, k <- m*k + (1-m)*q; its
*buffers* (BatchNorm running statistics) are its own, kept by its own forward passes on the keys,
as in facebookresearch/moco's `_momentum_update_key_encoder` and the Bi-tuning reference code.
Copying the online statistics instead (what the Bi-tuning path once did) would give the key
encoder statistics of the query views, not of the key views it normalises.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def projection_head(in_dim: int, dim: int = 128) -> nn.Sequential:
    """MoCo v2's 2-layer MLP (Linear-ReLU-Linear: facebookresearch's `fc.0/fc.2` layout), the head
    the contrastive losses act on; the classifier's features stay untouched by it."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, dim))


@torch.no_grad()
def momentum_update(online: Iterable[nn.Module], key: Iterable[nn.Module], momentum: float) -> None:
    """k <- m*k + (1-m)*q for every parameter of the key modules (paired with the online ones)."""
    queries = [p for module in online for p in module.parameters()]
    keys = [p for module in key for p in module.parameters()]
    torch._foreach_mul_(keys, momentum)
    torch._foreach_add_(keys, queries, alpha=1 - momentum)
