"""Reading data sets: a streaming pipeline for training and an in-memory path for small sets.

`stream` gives every consumer (DDP rank x DataLoader worker) a disjoint part of the data: whole
shards when there are at least as many shards as consumers, otherwise every consumer reads all
shards and keeps every n-th sample, so tiny data sets with one shard still split exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from unsupft.data.info import DatasetInfo, ShardInfo, read_info
from unsupft.data.shards import CorruptShard, decode, iter_shard

# Slots of the shared skip counter: one per DataLoader worker id (mod this), so workers never race.
_COUNTER_SLOTS = 64


class SkipCounter:
    """How many corrupt samples/shards were skipped, summed over DataLoader worker processes."""

    def __init__(self) -> None:
        self._slots = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()

    def add(self, worker: int) -> None:
        self._slots[worker % _COUNTER_SLOTS] += 1

    @property
    def value(self) -> int:
        return int(self._slots.sum())


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: memory stays at `size` items however long the stream."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class _ConsumerSamples(IterableDataset):
    """The decoded samples that belong to the calling rank and worker."""

    def __init__(self, info: DatasetInfo, labels: bool, shuffle: int, seed: int, repeat: bool,
                 skip_corrupt: bool, skipped: SkipCounter) -> None:
        self.info, self.labels, self.shuffle, self.seed = info, labels, shuffle, seed
        self.repeat, self.skip_corrupt, self.skipped = repeat, skip_corrupt, skipped
        self.epoch = 0

    def _raw(self, shards: list[ShardInfo], worker: int) -> Iterator[tuple[ShardInfo, dict]]:
        for shard in shards:
            try:
                for raw in iter_shard(self.info, shard):
                    yield shard, raw
            except CorruptShard:
                if not self.skip_corrupt:
                    raise
                self.skipped.add(worker)

    def _epoch(self, epoch: int, me: int = 0, consumers: int = 1, worker: int = 0) -> Iterator[tuple[str, torch.Tensor, int]]:
        """Consumer `me` of `consumers` in `epoch`; `worker` picks the skip-counter slot."""
        shards = list(self.info.shards)
        if self.shuffle > 0:  # the same order on every consumer, so the split below is exact
            random.Random(f"shards-{self.seed}-{epoch}").shuffle(shards)
        if len(shards) >= consumers:
            raw = self._raw(shards[me::consumers], worker)
        else:
            raw = (item for i, item in enumerate(self._raw(shards, worker)) if i % consumers == me)
        if self.shuffle > 1:
            raw = _shuffled(raw, self.shuffle, random.Random(f"samples-{self.seed}-{epoch}-{me}"))
        for shard, sample in raw:
            try:
                yield decode(sample, self.info, shard, self.labels)
            except CorruptShard:
                if not self.skip_corrupt:
                    raise
                self.skipped.add(worker)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        epoch = self.epoch
        while True:
            yield from self._epoch(epoch, rank * workers + worker, world * workers, worker)
            if not self.repeat:
                return
            epoch += 1


class SampleStream(wds.DataPipeline):
    """The WebDataset pipeline `stream` returns; `.skipped` counts what `skip_corrupt` dropped."""

    def __init__(self, source: _ConsumerSamples) -> None:
        super().__init__(source)
        self.source = source
        self.info = source.info

    @property
    def skipped(self) -> int:
        return self.source.skipped.value

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently for each epoch (call before iterating, as with DistributedSampler)."""
        self.source.epoch = epoch


def stream(uri: str, *, labels: bool = True, shuffle: int = 1000, seed: int = 0, repeat: bool = False,
           skip_corrupt: bool = False) -> SampleStream:
    """Stream `(key, uint8 image [C,H,W], label)` from the data set at `uri` (file or s3).

    Split by DDP rank and DataLoader worker; `shuffle` is the shuffle buffer size (0: file order);
    `repeat` cycles epochs forever; label is -1 when the set is unlabeled or `labels=False`.
    A corrupt shard or member raises a `UserError` naming shard and key, unless `skip_corrupt`.
    """
    info = read_info(uri)
    return SampleStream(_ConsumerSamples(info, labels, shuffle, seed, repeat, skip_corrupt, SkipCounter()))


@dataclass
class ArraySet:
    """A whole (small) data set in memory, in manifest order."""

    keys: list[str]
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # long [N], None when unlabeled
    info: DatasetInfo
    skipped: int = 0


def load_arrays(uri: str, *, skip_corrupt: bool = False) -> ArraySet:
    """Load every sample of the data set at `uri` into tensors (for few-shot subsets, features...)."""
    info = read_info(uri)
    source = _ConsumerSamples(info, True, 0, 0, False, skip_corrupt, SkipCounter())
    keys, images, labels = [], [], []
    for key, image, label in source._epoch(0):
        keys.append(key)
        images.append(image)
        labels.append(label)
    height, width = info.image_size
    return ArraySet(
        keys=keys,
        images=torch.stack(images) if images else torch.empty(0, info.channels, height, width, dtype=torch.uint8),
        labels=torch.tensor(labels, dtype=torch.long) if info.labeled else None,
        info=info,
        skipped=source.skipped.value,
    )
