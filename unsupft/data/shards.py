"""WebDataset tar shards: writing a data set (reading is `unsupft.data.index` and `.samples`).

Shards are plain tar files that `webdataset` (and `tar`) read; each sample is `<key>.<ext>` (ext
`png`, `jpg` or `webp`) plus `<key>.cls` (the label id as ASCII) when labeled. Everything here goes
through `unsupft.store`, so the same code reads and writes local directories and S3 prefixes.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import re
import secrets
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from unsupft import store
from unsupft.data.info import FORMAT, INFO_NAME, ShardInfo
from unsupft.errors import UserError

# The names `write_dataset` owns directly below a data set's URI: its shards and its sources file,
# with the generation token an overwrite adds ("shard-1f2e3d4c-000000.tar").
_OWNED_NAME = re.compile(r"^(shard-([0-9a-f]{8}-)?\d{6}\.tar|sources(-[0-9a-f]{8})?\.tsv)$")


@dataclass(frozen=True)
class Sample:
    """One encoded image to write: `data` in the format `ext` names; `source` is its provenance
    (a path relative to the source folder), None when the source has no files."""

    key: str
    data: bytes
    ext: str
    label: int | None
    source: str | None = None


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = 0o444
    tar.addfile(member, io.BytesIO(data))


class _ShardBuilder:
    """One shard being built in an anonymous temp file, sample by sample (memory: one sample)."""

    def __init__(self, name: str, labeled: bool) -> None:
        self.name, self.labeled, self.samples = name, labeled, 0
        self.file = tempfile.TemporaryFile()
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, sample: Sample) -> None:
        _add_member(self.tar, f"{sample.key}.{sample.ext}", sample.data)
        if self.labeled:
            _add_member(self.tar, f"{sample.key}.cls", str(sample.label).encode("ascii"))
        self.samples += 1

    def upload(self, out: str) -> ShardInfo:
        self.tar.close()
        digest = hashlib.sha256()
        self.file.seek(0)
        for chunk in iter(lambda: self.file.read(1 << 20), b""):
            digest.update(chunk)
        self.file.seek(0)
        store.upload_stream(store.join(out, self.name), self.file)
        self.file.close()
        return ShardInfo(self.name, self.samples, digest.hexdigest())


def write_dataset(out: str, samples: Iterable[Sample], *, classes: list[str], labeled: bool, channels: int,
                  image_size: tuple[int, int] | None | Callable[[], tuple[int, int] | None], source: str,
                  shard_size: int) -> dict[str, Any]:
    """Write `samples` as shards of `shard_size` under `out`, then `dataset.json` last; returns it.

    A data set already at `out` stays complete and readable until the new manifest replaces it in
    one atomic write: the new files get names the old manifest does not use (a fresh generation
    token), and only then are the old ones deleted. If writing fails, the files this call wrote
    are deleted and the old data set is untouched. Shards are built in anonymous temp files (no
    name in $TMPDIR, so a killed ingestion leaves nothing there) and uploaded whole (atomic in the
    store). `image_size` None says the images differ in size; a callable gives it once every sample
    is written (a source that learns its images' sizes only by streaming them). A `sources.tsv` (key, source path)
    is written beside the manifest when samples carry a source. Files left below `out` by a killed
    earlier ingestion (the owned shard/sources names no manifest lists) are removed at the end.
    """
    out = store.normalize(out)
    token = f"-{secrets.token_hex(4)}" if store.exists(store.join(out, INFO_NAME)) else ""
    sources_name = f"sources{token}.tsv"
    shards: list[ShardInfo] = []
    written: list[str] = []
    try:
        with io.TextIOWrapper(tempfile.TemporaryFile(), encoding="utf-8", newline="") as sources_text:
            sources_rows = csv.writer(sources_text, delimiter="\t", lineterminator="\n")
            has_sources = False

            def finish(shard: _ShardBuilder) -> None:
                written.append(shard.name)
                shards.append(shard.upload(out))

            shard: _ShardBuilder | None = None
            for sample in samples:
                if shard is None:
                    shard = _ShardBuilder(f"shard{token}-{len(shards):06d}.tar", labeled)
                shard.add(sample)
                if sample.source is not None:
                    sources_rows.writerow([sample.key, sample.source])
                    has_sources = True
                if shard.samples == shard_size:
                    finish(shard)
                    shard = None
            if shard is not None:
                finish(shard)
            total = sum(s.samples for s in shards)
            if total == 0:
                raise UserError(f"{out}: no samples to write (check --classes/--limit/--split)")
            if has_sources:
                sources_text.flush()
                sources_text.buffer.seek(0)
                written.append(sources_name)
                store.upload_stream(store.join(out, sources_name), sources_text.buffer)
        if callable(image_size):
            image_size = image_size()
        manifest = {
            "format": FORMAT,
            "samples": total,
            "classes": classes,
            "labeled": labeled,
            "image_size": list(image_size) if image_size is not None else None,
            "channels": channels,
            "shards": [{"name": s.name, "samples": s.samples, "sha256": s.sha256} for s in shards],
            "source": source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **({"sources": sources_name} if has_sources else {}),
        }
        store.write_json(store.join(out, INFO_NAME), manifest)
    except BaseException:
        for name in written:
            store.delete(store.join(out, name))
        raise
    keep = set(written)
    for name in store.list_prefix(out):
        if _OWNED_NAME.match(name) and name not in keep:
            store.delete(store.join(out, name))
    return manifest


class CorruptShard(UserError):
    """A shard or one of its members cannot be read; the message names the shard and the key."""
