"""Seeds: one call that seeds every generator a stage uses, and `mix_seed`, which derives the
independent seeds of data order, augmentation and mixing from a run's seed and a position."""

from __future__ import annotations

import random

import numpy as np
import torch

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs apart


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 0
    for p in parts:
        h = (h * 6364136223846793005 + (int(p) ^ _SEED_MIX) + 1442695040888963407) % (1 << 64)
    return h >> 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
