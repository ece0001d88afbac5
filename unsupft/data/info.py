"""`dataset.json`: the manifest that makes a directory of shards a data set.

It is written last, after every shard is in place, so its presence is the sign that a data set is
complete; readers refuse a URI without it instead of training on half an ingestion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unsupft import store
from unsupft.errors import UserError

FORMAT = "unsupft-shards/1"
INFO_NAME = "dataset.json"


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
    image_size: tuple[int, int]
    channels: int
    shards: list[ShardInfo] = field(default_factory=list)

    def shard_uri(self, shard: ShardInfo) -> str:
        return store.join(self.uri, shard.name)


def read_info(uri: str) -> DatasetInfo:
    """Read and check the manifest of the data set at `uri`."""
    uri = store.normalize(uri)
    info_uri = store.join(uri, INFO_NAME)
    if not store.exists(info_uri):
        raise UserError(
            f"{uri}: incomplete data set (no {INFO_NAME}); ingestion did not finish or this is not a data set "
            f"(make one with `unsupft ingest SOURCE {uri}`)"
        )
    raw = store.read_json(info_uri)
    try:
        if raw.get("format") != FORMAT:
            raise UserError(f"{info_uri}: format {raw.get('format')!r} is not {FORMAT!r}")
        height, width = (int(v) for v in raw["image_size"])
        info = DatasetInfo(
            uri=uri,
            samples=int(raw["samples"]),
            classes=[str(c) for c in raw["classes"]],
            labeled=bool(raw["labeled"]),
            image_size=(height, width),
            channels=int(raw["channels"]),
            shards=[ShardInfo(str(s["name"]), int(s["samples"]), str(s["sha256"])) for s in raw["shards"]],
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{info_uri}: malformed data set manifest ({type(exc).__name__}: {exc})") from exc
    if info.channels not in (1, 3):
        raise UserError(f"{info_uri}: channels must be 1 or 3, not {info.channels}")
    if sum(s.samples for s in info.shards) != info.samples:
        raise UserError(f"{info_uri}: the shard sample counts do not add up to samples={info.samples}")
    return info
