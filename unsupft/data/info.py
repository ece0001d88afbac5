"""`dataset.json`: the manifest that makes a directory of shards a data set.

It is written last, after every shard is in place, so its presence is the sign that a data set is
complete; readers refuse a URI without it instead of training on half an ingestion. While an
ingestion writes, `_INGESTING.json` beside the shards says so (a folder of shards without either
file is foreign: unsupft did not write it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from unsupft import store
from unsupft.errors import UserError
from unsupft.stage import DATASET_MANIFEST

FORMAT = "unsupft-shards/1"
INFO_NAME = DATASET_MANIFEST  # a data set is known by it, also as a stage input (unsupft.stage)
INGESTING_NAME = "_INGESTING.json"  # there while an ingestion writes (unsupft.data.shards)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class DatasetInfo:
    """What `dataset.json` says about a data set at `uri`."""

    uri: str
    samples: int
    classes: list[str]
    labeled: bool
    image_size: tuple[int, int] | None  # None: images of mixed sizes (a stage then needs a size)
    channels: int
    shards: list[ShardInfo] = field(default_factory=list)

    def shard_uri(self, shard: ShardInfo) -> str:
        return store.join(self.uri, shard.name)


def read_info(uri: str) -> DatasetInfo:
    """Read and check the manifest of the data set at `uri`."""
    uri = store.normalize(uri)
    info_uri = store.join(uri, INFO_NAME)
    if not store.exists(info_uri):
        raise UserError(f"{uri}: incomplete data set (no {INFO_NAME}); ingestion did not finish or this is not a "
                        f"data set (make one with `unsupft ingest SOURCE {uri}`)")
    raw = store.read_json(info_uri)
    try:
        if raw.get("format") != FORMAT:
            raise UserError(f"{info_uri}: format {raw.get('format')!r} is not {FORMAT!r}")
        size = raw["image_size"]
        height, width = (int(v) for v in size) if size is not None else (0, 0)
        shards = [ShardInfo(str(s["name"]), int(s["samples"]), str(s["sha256"])) for s in raw["shards"]]
        info = DatasetInfo(uri=uri, samples=int(raw["samples"]), classes=[str(c) for c in raw["classes"]],
                           labeled=bool(raw["labeled"]), image_size=(height, width) if size is not None else None,
                           channels=int(raw["channels"]), shards=shards)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{info_uri}: malformed data set manifest ({type(exc).__name__}: {exc})") from exc
    if info.channels not in (1, 3):
        raise UserError(f"{info_uri}: channels must be 1 or 3, not {info.channels}")
    for shard in info.shards:
        check_shard_name(info_uri, shard.name)
    if sum(s.samples for s in info.shards) != info.samples:
        raise UserError(f"{info_uri}: the shard sample counts do not add up to samples={info.samples}")
    return info


def check_shard_name(info_uri: str, name: str) -> None:
    """Refuse a manifest's shard name that would read outside its data set (`../x.tar`, an absolute
    path, a URI): a manifest must not make a reader open files it was not pointed at."""
    path = PurePosixPath(name)
    if not name or "://" in name or "\\" in name or path.is_absolute() or ".." in path.parts:
        raise UserError(f"{info_uri}: shard name {name!r} leaves the data set (names are relative, without '..')")
