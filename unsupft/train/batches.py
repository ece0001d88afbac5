"""Deterministic, resumable batches: step `s` always gets the same samples and augmentations.

The index stream is the concatenation of per-epoch orders (epoch `e`'s order comes from a
generator seeded by `(seed, e)`), cut into global batches of `batch_size * world_size`; rank `r`
takes its slice of each. So step `s` can be produced directly, without replaying steps 0..s-1,
which is what makes a resumed run continue the same run. Each sample also gets its own seed
(from `seed` and its position in the stream) under which its augmentation runs, so the images a
step sees do not depend on DataLoader workers, their number, or resuming.

Any data set size and batch size work: a batch that crosses an epoch boundary takes the rest of
one epoch and the start of the next, and data sets smaller than a batch repeat within it. A
model with BatchNorm trains on batches of at least `MIN_BN_BATCH` images (`require_bn_batch`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from unsupft.errors import UserError
from unsupft.seeding import mix_seed

# BatchNorm in training mode normalises each channel over the batch: one image at a 1x1 feature
# map leaves one value ("Expected more than 1 value per channel when training"), and at larger
# maps its statistics are one image's, not the data's.
MIN_BN_BATCH = 2


def require_bn_batch(batch_size: int, processes: int = 1) -> None:
    """Refuse `--batch-size` (one line, before anything is written) when it gives each of
    `processes` (those sharing a global batch) fewer than `MIN_BN_BATCH` images per batch."""
    if batch_size // processes < MIN_BN_BATCH:
        each = f" on each of {processes} processes" if processes > 1 else ""
        raise UserError(f"--batch-size {batch_size}: BatchNorm trains on batches of at least {MIN_BN_BATCH} "
                        f"images{each}; give a larger --batch-size")


class EpochOrder(Protocol):
    """What a training epoch consists of: a fixed number of indices, reordered per epoch."""

    size: int

    def __call__(self, epoch: int) -> torch.Tensor:
        """The `size` data set indices of `epoch` in training order (deterministic in `epoch`)."""


class Shuffled:
    """Each epoch visits every index of a data set of `n` once, in a seeded random order."""

    def __init__(self, n: int, seed: int) -> None:
        self.size = n
        self.seed = seed

    def __call__(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)


class ShardWindows:
    """`base`'s epochs (the same indices) regrouped so that reading them touches a few shards at a time.

    Per epoch, a seeded order of the shards is cut into windows of about `window_bytes` (consecutive
    shards in that order, a window closing once its shards reach the size), and the epoch's indices
    are shuffled within their window, the windows following one another. A batch then draws from
    the few shards of one window (two at a window's edge), which is what lets a reader fetch each
    shard whole once per epoch instead of one request per sample. Still a pure function of
    (seed, epoch), so resume stays exact. When every shard fits in one window the epoch is `base`'s
    unchanged: small data sets train exactly as with a full shuffle.
    """

    def __init__(self, base: EpochOrder, shard_of: torch.Tensor, shard_bytes: torch.Tensor, window_bytes: int,
                 seed: int) -> None:
        self.base, self.shard_of, self.shard_bytes = base, shard_of, shard_bytes
        self.window_bytes, self.seed, self.size = max(1, window_bytes), seed, base.size
        self.windowed = int(shard_bytes.sum()) > window_bytes

    def __call__(self, epoch: int) -> torch.Tensor:
        indices = self.base(epoch)
        if not self.windowed:
            return indices
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2))
        shard_order = torch.randperm(len(self.shard_bytes), generator=g)
        in_order = self.shard_bytes[shard_order]
        window = torch.empty_like(shard_order)
        window[shard_order] = (torch.cumsum(in_order, 0) - in_order) // self.window_bytes
        shuffled = indices[torch.randperm(len(indices), generator=g)]
        return shuffled[torch.argsort(window[self.shard_of[shuffled]], stable=True)]


class StepBatchSampler:
    """Yields, for steps `start_step`..`steps-1`, this rank's `[(index, sample_seed), ...]`."""

    def __init__(self, order: EpochOrder, batch_size: int, steps: int, seed: int,
                 start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if order.size < 1:
            raise ValueError("cannot draw batches from an empty data set")
        self.order, self.batch_size, self.steps, self.seed = order, batch_size, steps, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self._epoch, self._indices = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.order.size)
        if epoch != self._epoch:
            self._epoch, self._indices = epoch, self.order(epoch)
        return int(self._indices[offset])

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return [(self._index_at(p), mix_seed(self.seed, p)) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.steps):
            yield self.batch(step)


class SeededDataset(Dataset):
    """Items `(index, seed)` -> `fn(index)` computed with the global torch RNG seeded by `seed`.

    torchvision's random transforms draw from the global RNG; forking it per sample makes every
    augmentation a pure function of the sample's position in the stream.
    """

    def __init__(self, n: int, fn: Callable[[int], Any]) -> None:
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        # Only the CPU generator: `torch.manual_seed` would also queue a seed for every accelerator
        # backend, recording a stack trace each time (a third of a 28 px sample's cost), and
        # `torch.random.fork_rng` costs ~4 ms a call. The transforms draw from the CPU generator.
        outer = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.fn(index)
        finally:
            torch.default_generator.set_state(outer)


class LoaderBatches:
    """A resumable batch source over a seeded sample function, loaded by a DataLoader.

    `sample(index)` returns one training example (tensors, tuples of tensors, ...); it runs in
    DataLoader workers under a per-sample seed. `order` decides what an epoch contains
    (default: every index once, shuffled). This is the `BatchSource` that `train` resumes exactly.
    """

    def __init__(self, sample: Callable[[int], Any], n: int, batch_size: int, seed: int, *,
                 order: EpochOrder | None = None, num_workers: int = 0) -> None:
        self.dataset = SeededDataset(n, sample)
        self.order = order or Shuffled(n, seed)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers

    @property
    def samples_per_epoch(self) -> int:
        return self.order.size

    def batches(self, start_step: int, steps: int, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        sampler = StepBatchSampler(self.order, self.batch_size, steps, self.seed, start_step, rank, world_size)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(),
                            # its own generator: creating the iterator must not draw from the global
                            # RNG, whose state a resumed run restores from the checkpoint
                            generator=torch.Generator().manual_seed(self.seed))
        return iter(loader)
