"""Lazy, index-addressable images: what every stage trains and evaluates on.

`open_samples(uri)` indexes a data option (`unsupft.data.index`) and returns `Samples`, whose
`image(i)` reads sample i's image member (a pread locally; on S3 through the node's shard cache,
`unsupft.data.shardcache`), decodes it and returns uint8 [C, H, W] at its stored size. Nothing is
decoded before it is asked for, so memory does not grow with the data set: `Samples` pickles as its
index arrays, and DataLoader workers read and decode their own samples. Because samples are
addressed by index, the training machinery (`unsupft.train.batches`) draws any step's batch
directly, which is what keeps resume exact.

One resize path: training crops from the stored image (MoCo's RandomResizedCrop to the training
size); evaluation, feature extraction and finetuning use `fit` (resize the short side, centre crop),
through the `Fitted` view. Several data sets train as one index space through `Mixture` (TUP's
source + target, adaptation's target + replayed source subset).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from unsupft import store
from unsupft.data.encode import UnsupportedPixels, eight_bit
from unsupft.data.index import SampleIndex, open_index
from unsupft.data.shardcache import shard_cache
from unsupft.data.shards import CorruptShard
from unsupft.errors import UserError
from unsupft.preprocess import fit


_OPEN_SHARDS = 64  # local shard files a process keeps open (an epoch's order visits them all)


def default_workers() -> int:
    """DataLoader workers: decoding and augmentation run beside the model, leaving it most cores."""
    return min(8, (os.cpu_count() or 2) // 2)


def decode_image(data: bytes, channels: int, where: Callable[[], str]) -> torch.Tensor:
    """uint8 [C, H, W] of an encoded image; grayscale sets decode as one channel ("L") on purpose,
    16-bit images scaled to 8 bits (`eight_bit`). `where()` names the sample in an error (built only
    then: it costs a key lookup)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.array(eight_bit(img, "L" if channels == 1 else "RGB"), dtype=np.uint8)
    except UnsupportedPixels as exc:
        raise CorruptShard(f"{where()}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptShard(f"{where()}: undecodable image ({exc})") from exc
    image = torch.from_numpy(pixels)
    return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1).contiguous()


class Samples:
    """The images of one data set, read and decoded on demand (see the module docstring)."""

    def __init__(self, index: SampleIndex) -> None:
        self.index = index
        self.uri, self.classes, self.channels = index.uri, index.classes, index.channels
        self.image_size = index.image_size
        self._local = [store.local_path(uri) for uri in index.shard_uris]  # None: on S3, read through the shard cache
        self._files: dict[int, int] = {}  # shard -> open descriptor, in the process that opened it
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of a local shard, kept per process (a forked worker opens its own) and
        at most `_OPEN_SHARDS` at a time."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            if len(self._files) >= _OPEN_SHARDS:
                os.close(self._files.pop(next(iter(self._files))))
            try:
                fd = self._files[shard] = os.open(self._local[shard], os.O_RDONLY)
            except FileNotFoundError as exc:
                raise UserError(f"{self.index.shard_uris[shard]}: no such file") from exc
        return fd

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> torch.Tensor | None:
        """Class ids [N] (long), None when the data set is unlabeled; read from the index, no image decoded."""
        return None if self.index.labels is None else torch.from_numpy(self.index.labels)

    def key(self, i: int) -> str:
        return self.index.key(i)

    def keys(self) -> list[str]:
        return self.index.keys()

    def encoded(self, i: int) -> bytes:
        """Sample i's image member as stored (JPEG, PNG or WebP bytes): a pread locally; on S3 a
        ranged GET, or a pread of the whole shard fetched into the node's cache (`shardcache`)."""
        index = self.index
        shard, offset, size = int(index.shard[i]), int(index.offset[i]), int(index.size[i])
        if self._local[shard] is None:
            data = shard_cache().read(index.shard_uris[shard], index.shard_versions[shard], offset, size)
        else:
            data = os.pread(self._descriptor(shard), size, offset)
        if len(data) != size:
            raise UserError(f"{index.shard_uris[shard]}: {size} bytes expected at offset {offset}, got {len(data)} "
                            f"(the shard changed since it was indexed?)")
        return data

    def image(self, i: int) -> torch.Tensor:
        """Sample i's image, uint8 [C, H, W] at its stored size."""
        return decode_image(self.encoded(i), self.channels,
                            lambda: f"{self.index.shard_uris[int(self.index.shard[i])]}: sample {self.key(i)!r}")

    def raw(self) -> Iterator[RawSample]:
        """Every sample as stored, in shard order, without decoding: what copying shards (for
        example into an unsupft data set) needs."""
        labels = self.index.labels
        for i in range(len(self)):
            data = self.encoded(i)
            extension = image_format(data)
            if extension is None:
                shard = self.index.shard_uris[int(self.index.shard[i])]
                raise CorruptShard(f"{shard}: sample {self.key(i)!r}: not a JPEG, PNG or WebP image")
            yield RawSample(self.key(i), data, extension, None if labels is None else int(labels[i]))


@dataclass(frozen=True)
class RawSample:
    key: str
    image: bytes  # the encoded image member
    extension: str  # "jpg", "png" or "webp", from the bytes' signature
    label: int | None  # class id (a position in the data set's classes), None when unlabeled


def image_format(data: bytes) -> str | None:
    """The file extension an encoded image's signature calls for (foreign shards may misname
    members), None when it is none of JPEG, PNG and WebP."""
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def open_samples(uri: str, channels: int | None = None) -> Samples:
    """`Samples` of a data option; `channels` (of the other inputs) must match when given."""
    samples = Samples(open_index(uri))
    if channels is not None and samples.channels != channels:
        raise UserError(f"{uri}: has {samples.channels}-channel images, the other inputs {channels}-channel")
    return samples


def image_size_of(samples: Samples, wanted: int | Sequence[int] | None, remedy: str) -> list[int]:
    """The size to work at: `wanted` (an option or a model's recorded size), else the manifest's;
    data sets of mixed sizes without either are one line ending "give `remedy`" (what would supply
    the size: "--image-size", "an --init with a recorded image size"; callers that write the "give"
    themselves get it once)."""
    if wanted is not None:
        return [int(wanted)] * 2 if isinstance(wanted, int) else [int(s) for s in wanted]
    if samples.image_size is None:
        raise UserError(f"{samples.uri}: images of mixed or unknown sizes (no image_size in a manifest); "
                        f"give {remedy.removeprefix('give ')}")
    return list(samples.image_size)


class Fitted(Dataset):
    """`samples` (or the subset `indices` of it) fitted to `size`: the evaluation view.

    Items are uint8 [C, H, W]; a list or tensor of positions gives the stacked batch (how few-shot
    subsets are loaded into memory). A DataLoader over it reads in index order, shard by shard.
    """

    def __init__(self, samples: Samples, size: Sequence[int], indices: Sequence[int] | None = None) -> None:
        self.samples, self.size = samples, [int(s) for s in size]
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples) if self.indices is None else len(self.indices)

    def __getitem__(self, item: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.ndim == 0):
            i = int(item)
            return fit(self.samples.image(i if self.indices is None else int(self.indices[i])), self.size)
        return torch.stack([self[int(i)] for i in item]) if len(item) else torch.empty(
            0, self.samples.channels, *self.size, dtype=torch.uint8)


# Subsets up to this many samples are decoded once into memory (few-shot draws, label lists):
# cheaper than decoding them again every epoch, and small whatever the data set's size.
IN_MEMORY_SAMPLES = 4096


def subset(samples: Samples, size: Sequence[int], indices: Sequence[int]) -> Dataset | torch.Tensor:
    """The samples at `indices` fitted to `size`: a tensor when small, else a lazy `Fitted` view."""
    view = Fitted(samples, size, indices)
    return view[range(len(view))] if len(view) <= IN_MEMORY_SAMPLES else view


def batches_of(images: Dataset | torch.Tensor, batch_size: int, workers: int | None = None) -> DataLoader:
    """uint8 [B, C, H, W] batches of same-sized images in order, decoded in `workers` processes
    (default: none for tensors already in memory, `default_workers()` for lazy images)."""
    if workers is None:
        workers = 0 if isinstance(images, torch.Tensor) else default_workers()
    return DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)


class Mixture:
    """Several data sets as one index space, each whole or restricted to a subset of its indices:
    position p falls in the part whose range holds it (the parts are laid out one after another)."""

    def __init__(self, parts: Sequence[tuple[Samples, Sequence[int] | None]]) -> None:
        self.parts = [(s, None if sub is None else np.asarray(sub, dtype=np.int64)) for s, sub in parts]
        self.ends = np.cumsum([len(s) if sub is None else len(sub) for s, sub in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def shard_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard id of every position [N], bytes of every shard [S]): the parts' shards numbered one
        after another, what `unsupft.train.batches.ShardWindows` groups an epoch by."""
        shard_ids, shard_bytes, first = [], [], 0
        for samples, sub in self.parts:
            shards = samples.index.shard if sub is None else samples.index.shard[sub]
            shard_ids.append(torch.from_numpy(shards.astype(np.int64) + first))
            shard_bytes.append(torch.from_numpy(samples.index.shard_bytes()))
            first += len(samples.index.shard_uris)
        return torch.cat(shard_ids), torch.cat(shard_bytes)

    def image(self, position: int) -> torch.Tensor:
        part = int(np.searchsorted(self.ends, position, side="right"))
        local = position - (int(self.ends[part - 1]) if part else 0)
        samples, subset = self.parts[part]
        return samples.image(local if subset is None else int(subset[local]))
