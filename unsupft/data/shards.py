"""WebDataset tar shards: writing a data set (reading is `unsupft.data.index` and `.samples`).

Shards are plain tar files that `webdataset` (and `tar`) read; each sample is `<key>.png` plus
`<key>.cls` (the label id as ASCII) when labeled. Everything here goes through `unsupft.store`, so
the same code reads and writes local directories and S3 prefixes.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from unsupft import store
from unsupft.data.info import FORMAT, INFO_NAME, DatasetInfo, ShardInfo, read_info
from unsupft.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One image to write: `image` is uint8 HxW (grayscale) or HxWx3 (colour)."""

    key: str
    image: np.ndarray
    label: int | None


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(out, format="PNG")
    return out.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = 0o444
    tar.addfile(member, io.BytesIO(data))


def write_dataset(
    out: str,
    samples: Iterable[Sample],
    *,
    classes: list[str],
    labeled: bool,
    channels: int,
    image_size: tuple[int, int],
    source: str,
    shard_size: int,
) -> DatasetInfo:
    """Write `samples` as shards of `shard_size` under `out`, then `dataset.json` last.

    A previous manifest at `out` is removed first, so a reader never pairs it with half-rewritten
    shards; each shard is built in a local temp file and uploaded whole (atomic in the store).
    """
    out = store.normalize(out)
    store.delete(store.join(out, INFO_NAME))
    shards: list[ShardInfo] = []
    with tempfile.TemporaryDirectory(prefix="unsupft-ingest-") as tmp:
        batch: list[Sample] = []

        def flush() -> None:
            path = Path(tmp) / shard_name(len(shards))
            with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in batch:
                    _add_member(tar, f"{sample.key}.png", encode_png(sample.image))
                    if labeled:
                        _add_member(tar, f"{sample.key}.cls", str(sample.label).encode("ascii"))
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            store.upload_file(path, store.join(out, path.name))
            path.unlink()
            shards.append(ShardInfo(path.name, len(batch), digest))
            batch.clear()

        for sample in samples:
            batch.append(sample)
            if len(batch) == shard_size:
                flush()
        if batch:
            flush()
    total = sum(s.samples for s in shards)
    if total == 0:
        raise UserError(f"{out}: no samples to write (check --classes/--limit/--split)")
    manifest = {
        "format": FORMAT,
        "samples": total,
        "classes": classes,
        "labeled": labeled,
        "image_size": list(image_size),
        "channels": channels,
        "shards": [{"name": s.name, "samples": s.samples, "sha256": s.sha256} for s in shards],
        "source": source,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    store.write_json(store.join(out, INFO_NAME), manifest)
    return read_info(out)


class CorruptShard(UserError):
    """A shard or one of its members cannot be read; the message names the shard and the key."""
