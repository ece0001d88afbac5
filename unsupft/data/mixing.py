"""Mixing data sets into one training stream, and mixing images within a batch.

Between data sets (epoch composition, used through `unsupft.train.batches.LoaderBatches`):
- TUP re-balancing: every epoch holds all source images plus `ratio * |source|` target images,
  drawn afresh each epoch (repeating the target when it is smaller than that).
- Sparse source replay: a fixed random subset of the source (`replay_subset`, chosen once from
  the seed) is drawn from in every epoch of the target, in proportion to the target's size.
Within a batch (the mixed query of unsupervised finetuning): `cutmix` and `mixup`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unsupft.seeding import mix_seed


@dataclass(frozen=True)
class Part:
    """`count` draws per epoch from the data set indices `offset + pool`."""

    offset: int
    pool: torch.Tensor
    count: int


class PartsOrder:
    """An `EpochOrder` over concatenated data sets: each part contributes `count` indices per epoch
    (its whole pool once when count == len(pool); otherwise random draws, without repeats until
    the pool is used up), and the epoch is shuffled as a whole."""

    def __init__(self, parts: list[Part], seed: int) -> None:
        self.parts = [p for p in parts if p.count > 0]
        self.size = sum(p.count for p in self.parts)
        self.seed = seed

    def __call__(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
        chosen = []
        for part in self.parts:
            rounds = math.ceil(part.count / len(part.pool))
            draws = torch.cat([torch.randperm(len(part.pool), generator=g) for _ in range(rounds)])[: part.count]
            chosen.append(part.offset + part.pool[draws])
        epoch_indices = torch.cat(chosen)
        return epoch_indices[torch.randperm(len(epoch_indices), generator=g)]


def rebalanced(n_source: int, n_target: int, target_ratio: float, seed: int) -> PartsOrder:
    """TUP: indices [0, n_source) are the source, [n_source, n_source + n_target) the target."""
    return PartsOrder([Part(0, torch.arange(n_source), n_source),
                       Part(n_source, torch.arange(n_target), max(1, round(target_ratio * n_source)))], seed)


def replay_subset(n_source: int, fraction: float, seed: int) -> torch.Tensor:
    """The fixed, seeded subset of source indices replayed during adaptation (sorted)."""
    count = round(fraction * n_source)
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5EED))
    return torch.randperm(n_source, generator=g)[:count].sort().values


def with_replay(n_target: int, replay: torch.Tensor, seed: int, ratio: float | None = None) -> PartsOrder:
    """Adaptation epochs: all target images [0, n_target) plus `ratio * n_target` draws from the
    replayed source indices (stored after the target: index n_target + i is replay[i]), at most
    the whole subset; `ratio=None` replays the whole subset every epoch.

    Sizing replay by the target keeps the target's share of training fixed: a fixed 10% of a
    60,000-image source beside a 1,258-image target would make five of six samples source images,
    and the target would be seen five times less often than in naive finetuning (issue 12)."""
    per_epoch = len(replay) if ratio is None else min(len(replay), max(1, round(ratio * n_target)))
    return PartsOrder([Part(0, torch.arange(n_target), n_target),
                       Part(n_target, torch.arange(len(replay)), per_epoch)], seed)


def cutmix(images: torch.Tensor, partner: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, float]:
    """Paste a random box of `images[partner]` into `images`; returns the mixed batch and lam, the
    share of each mixed image that is still its own (the area ratio, after clipping the box)."""
    h, w = images.shape[-2:]
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2 + cut_h % 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2 + cut_w % 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[partner][..., y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (h * w)


def mixup(images: torch.Tensor, partner: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, float]:
    """`lam * images + (1 - lam) * images[partner]` with lam ~ Beta(alpha, alpha)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam * images + (1 - lam) * images[partner], lam
