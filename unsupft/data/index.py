"""Where every sample of a data set lies: the sample index that lets a stage read any sample lazily.

A data option (`--data`, `--target`, `--train`, ...) names an unsupft data set (a folder or S3
prefix with `dataset.json`), a single `.tar`, a folder or prefix of tars, or a brace pattern
(`s3://b/imagenet/train-{000000..001023}.tar`). `open_index` resolves it to shards and scans each
shard once, recording for every sample its shard, the byte offset and size of its image member,
its label and its key. The tars are read sequentially (one GET per shard on S3), hashed on the way
and checked against the manifest's sha256 and sample count, so integrity costs no extra read.

The result is cached per shard under `$UNSUPFT_CACHE` (default `~/.cache/unsupft`) in `index/`,
keyed by the shard's URI, its version (size + ETag on S3, size + mtime locally) and the digest the
manifest expects; a shard that changes gets a new key and is scanned (and verified) again. Nothing
is ever written next to the user's data. In memory the index is a handful of numpy arrays
(about 30 bytes per sample plus the keys' bytes), never a Python object per sample.

Foreign shards (written by `webdataset.ShardWriter`, img2dataset, ...): a sample is the members
sharing a key (WebDataset's rule: the path up to the first dot of the file name); its image is the
`.jpg`, `.jpeg`, `.png` or `.webp` member, its label the integer in `.cls` or the `label`, `cls`,
`class` or `target` field of `.json` (other members, captions in `.txt` for example, are ignored).
Their classes are the label ids found, in increasing order (named by the ids); their channels
follow the first image (grayscale: 1, anything else: 3); their image size is not known (mixed).
Having no digest to check, each of their images is identified (its header parsed) while scanning,
so a member that is no image stops the stage before it writes anything. A member name that is not
UTF-8 keeps its bytes as `\\xe9` escapes in the key. A folder of tars is foreign unless unsupft
marked it as its own unfinished ingestion (`_INGESTING.json`, or, from before that marker, shards
named and written the way `unsupft ingest` writes them): those are refused, not read half-written.

Keys name samples (`--labels`, `--initial`, label rounds), so a key that appears twice is refused
(`unsupft ingest` writes a copy with unique keys).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from braceexpand import braceexpand
from PIL import Image

from unsupft import store
from unsupft.data.encode import GRAY_MODES, WIDE_MODES, UnsupportedPixels, eight_bit
from unsupft.data.info import INFO_NAME, INGESTING_NAME, DatasetInfo, read_info
from unsupft.data.shards import SHARD_NAME, CorruptShard, written_by_unsupft
from unsupft.data.sources import require_file_or_folder
from unsupft.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_LABEL_FIELDS = ("label", "cls", "class", "target")
INDEX_FORMAT = "unsupft-index/2"
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_INDEX_THREADS = 8  # shards scanned at once: first reads from S3 are bound by latency, not CPU


def cache_dir() -> Path:
    """Where derived files (sample indexes) go: `$UNSUPFT_CACHE`, else `~/.cache/unsupft`."""
    return Path(os.environ.get("UNSUPFT_CACHE") or Path.home() / ".cache" / "unsupft")


@dataclass(frozen=True)
class ShardRef:
    """A shard to index, with what its manifest promises (None for foreign shards)."""

    uri: str
    samples: int | None = None
    sha256: str | None = None


def resolve(uri: str) -> tuple[DatasetInfo | None, list[ShardRef]]:
    """(manifest or None, shards) of a data option; one `UserError` line when it names nothing."""
    if "{" in uri:
        shard_uris = list(braceexpand(uri))
        for shard in shard_uris:
            if not store.exists(store.normalize(shard)):
                raise UserError(f"{uri}: the pattern names {shard}, which does not exist")
        return None, [ShardRef(store.normalize(s)) for s in shard_uris]
    uri = store.normalize(uri)
    local = store.local_path(uri)
    if local is not None:
        require_file_or_folder(local)
    if uri.endswith(".tar"):
        if not store.exists(uri):
            raise UserError(f"{uri}: no such shard")
        return None, [ShardRef(uri)]
    if store.exists(store.join(uri, INFO_NAME)):
        info = read_info(uri)
        return info, [ShardRef(info.shard_uri(s), s.samples, s.sha256) for s in info.shards]
    names = store.list_prefix(uri)
    marker = next((name for name in names if PurePosixPath(name).name == INGESTING_NAME), None)
    if marker is not None:
        raise UserError(f"{uri}: an unfinished ingestion ({marker} is there, {INFO_NAME} is not); "
                        f"rerun that `unsupft ingest` to finish it")
    tars = [name for name in names if name.endswith(".tar")]
    if not tars or (all(SHARD_NAME.fullmatch(name) for name in tars) and written_by_unsupft(store.join(uri, tars[0]))):
        # no shards, or what an ingestion killed before it wrote markers left: not (yet) a data set
        read_info(uri)  # raises "incomplete data set (no dataset.json); ... not a data set ..."
    return None, [ShardRef(store.join(uri, name)) for name in tars]


class _HashingReader:
    """A read-only stream that hashes what passes through it (tarfile reads it sequentially)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardIndex:
    """One shard's samples, in file order."""

    key_bytes: bytes  # every key's UTF-8 bytes, back to back
    key_ends: np.ndarray  # int64: where each key ends in key_bytes
    offsets: np.ndarray  # int64: where the image member's bytes start
    sizes: np.ndarray  # int64: the image member's length
    labels: np.ndarray  # int64: the raw label id, -1 where the sample has none
    first_mode: str  # PIL mode of the first image ("" for manifest shards): channels of foreign sets


_MAX_LABEL = int(np.iinfo(np.int64).max)  # labels are kept as int64


def _label_of(ext: str, data: bytes) -> int | None:
    """The class id a `.cls` or `.json` member holds, None when it holds none; a ValueError saying
    what is wrong with a label that is no class id, so that no label is dropped without a word.

    `.cls` is the id as text (webdataset's convention); in `.json` the first of JSON_LABEL_FIELDS
    present holds it, as a number or as the text of one (`{"label": "3"}`, as CSV converters write).
    -1 marks an unlabeled sample (as Hugging Face datasets and torchvision's STL-10 write it).
    """
    if ext == "cls":
        field, value = ".cls", data.decode("ascii")
    else:
        try:
            fields = json.loads(data)
        except RecursionError as exc:  # nested deeper than Python's stack: malformed, one line like the rest
            raise ValueError("JSON nested too deeply") from exc
        if not isinstance(fields, dict):
            return None
        name = next((name for name in JSON_LABEL_FIELDS if fields.get(name) is not None), None)
        if name is None:
            return None
        field, value = f"json field {name!r}", fields[name]
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:36] + "..."
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        value = int(value) if len(value) <= 40 else _MAX_LABEL + 1  # too large (int() refuses 4300 digits)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field} is {shown}, not a class id (an integer; foreign shards' class names are not read)")
    if value == -1:
        return None
    if value < 0:
        raise ValueError(f"{field} is {shown}: class ids are 0 or more (-1 marks an unlabeled sample)")
    if value > _MAX_LABEL:
        raise ValueError(f"{field} is {shown}, too large for a class id (at most {_MAX_LABEL})")
    return value


def _identify(data: bytes, uri: str, key: str) -> str:
    """The PIL mode of an encoded image, read from its header; a `CorruptShard` when it is none, or
    when its pixels have no 8-bit form (32-bit ones are decoded to see: rare, and refused here rather
    than when a stage decodes them, after it has started writing its output)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in WIDE_MODES:
                eight_bit(img, "L")
            return img.mode
    except UnsupportedPixels as exc:
        raise CorruptShard(f"{uri}: sample {key!r}: {exc}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptShard(f"{uri}: sample {key!r}: not a decodable image ({exc})") from exc


def _scan(ref: ShardRef, foreign: bool) -> ShardIndex:
    """Read one shard once: member offsets, labels, and the checks against its manifest entry
    (foreign shards, which have none, get each image's header identified instead)."""
    keys: list[str] = []
    offsets, sizes, labels = [], [], []
    first_mode = ""
    current, image, label = None, None, None

    def close_sample() -> None:
        if current is None:
            return
        if image is None:
            raise CorruptShard(f"{ref.uri}: sample {current!r} has no image member "
                               f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
        keys.append(current)
        offsets.append(image[0])
        sizes.append(image[1])
        labels.append(-1 if label is None else label)

    with store.open_read(ref.uri) as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    match = _KEY_EXT.match(member.name) if member.isreg() else None
                    if match is None:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if key != current:
                        close_sample()
                        current, image, label = key, None, None
                    if ext in IMAGE_EXTENSIONS and image is None:
                        image = (member.offset_data, member.size)
                        if foreign:  # no digest to check against: identify each image (its header)
                            mode = _identify(tar.extractfile(member).read(), ref.uri, key)
                            first_mode = first_mode or mode
                    elif ext in ("cls", "json"):
                        try:
                            found = _label_of(ext, tar.extractfile(member).read())
                        except (ValueError, UnicodeDecodeError) as exc:
                            raise CorruptShard(f"{ref.uri}: sample {key!r}: malformed {ext} member ({exc})") from exc
                        if found is not None:  # a .json without a label field keeps the .cls label
                            label = found
                close_sample()
            reader.drain()
        except (tarfile.TarError, EOFError, OSError) as exc:
            where = f"after key {keys[-1]!r}" if keys else "at its start"
            raise CorruptShard(f"{ref.uri}: corrupt shard {where}: {exc}") from exc
    if ref.sha256 is not None and reader.sha256.hexdigest() != ref.sha256:
        raise CorruptShard(f"{ref.uri}: sha256 does not match dataset.json (the shard changed or is damaged)")
    if ref.samples is not None and len(keys) != ref.samples:
        raise CorruptShard(f"{ref.uri}: holds {len(keys)} samples, dataset.json says {ref.samples}")
    if not keys:
        raise UserError(f"{ref.uri}: no image member in the shard ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    encoded = [_key_bytes(k) for k in keys]
    return ShardIndex(b"".join(encoded), np.cumsum([len(k) for k in encoded], dtype=np.int64),
                      np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), np.asarray(labels, np.int64),
                      first_mode)


def _key_bytes(key: str) -> bytes:
    """A key's UTF-8; a member name that is not UTF-8 (tarfile hands its bytes over as surrogates)
    keeps each such byte as a `\\xe9` escape, so the key is text that every reader can print."""
    try:
        return key.encode()
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode()


def _cache_file(ref: ShardRef, version: str) -> Path:
    key = json.dumps([INDEX_FORMAT, ref.uri, version, ref.sha256, ref.samples])
    return cache_dir() / "index" / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"


def _index_shard(ref: ShardRef, version: str, foreign: bool) -> ShardIndex:
    """The shard's index (of the shard at `version`) from the cache, or scanned (and verified) now and cached."""
    path = _cache_file(ref, version)
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            mode = str(cached["first_mode"])
            if mode or not foreign:
                return ShardIndex(cached["key_bytes"].tobytes(), cached["key_ends"], cached["offsets"],
                                  cached["sizes"], cached["labels"], mode)
    shard = _scan(ref, foreign)
    tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, offsets=shard.offsets, sizes=shard.sizes, labels=shard.labels,
                     key_bytes=np.frombuffer(shard.key_bytes, np.uint8), key_ends=shard.key_ends,
                     first_mode=np.array(shard.first_mode))
        os.replace(tmp, path)  # atomic: another process indexing the same shard writes the same bytes
    except OSError:  # a read-only or full cache: this run keeps its index in memory, the next one scans again
        with contextlib.suppress(OSError):
            tmp.unlink()
    return shard


@dataclass
class SampleIndex:
    """Every sample of a data set: where its image lies, its label, its key (numpy arrays)."""

    uri: str  # the data option as given
    shard_uris: list[str]
    shard_versions: list[str]  # store.version() of each shard when indexed: "size:ETag" / "size:mtime"
    shard: np.ndarray  # int32 [N]: position in shard_uris
    offset: np.ndarray  # int64 [N]
    size: np.ndarray  # int64 [N]
    labels: np.ndarray | None  # int64 [N] class ids, None when unlabeled
    key_bytes: np.ndarray  # uint8: every key's UTF-8 bytes, back to back
    key_ends: np.ndarray  # int64 [N]: where key i ends in key_bytes
    classes: list[str]
    channels: int
    image_size: tuple[int, int] | None  # None: mixed sizes (foreign shards, photo folders)

    def __len__(self) -> int:
        return len(self.offset)

    def key(self, i: int) -> str:
        start = int(self.key_ends[i - 1]) if i > 0 else 0
        return self.key_bytes[start:int(self.key_ends[i])].tobytes().decode()

    def keys(self) -> list[str]:
        return [self.key(i) for i in range(len(self))]

    def shard_bytes(self) -> np.ndarray:
        """int64 [shards]: each shard's size in bytes (what fetching it whole costs)."""
        return np.array([int(v.split(":", 1)[0]) for v in self.shard_versions], dtype=np.int64)


def _repeated_key(index: SampleIndex) -> tuple[int, int] | None:
    """(first, second) positions of the first key that appears twice in `index`, None when keys are
    unique (one pass over the keys' bytes; the positions are looked for only when there is one)."""
    blob, ends = index.key_bytes.tobytes(), index.key_ends.tolist()
    keys = [blob[start:end] for start, end in zip([0, *ends[:-1]], ends)]
    if len(set(keys)) == len(keys):
        return None
    first: dict[bytes, int] = {}
    return next((first[key], i) for i, key in enumerate(keys) if first.setdefault(key, i) != i)


def open_index(uri: str, unique_keys: bool = True) -> SampleIndex:
    """Resolve a data option and index its shards (from the cache after the first read). A key
    that appears twice is one line unless `unique_keys` is off (ingestion makes them unique)."""
    info, refs = resolve(uri)
    if not refs:
        raise UserError(f"{uri}: the data set is empty")
    with concurrent.futures.ThreadPoolExecutor(min(_INDEX_THREADS, len(refs))) as pool:
        versions = list(pool.map(lambda ref: store.version(ref.uri), refs))
        shards = list(pool.map(lambda ref, version: _index_shard(ref, version, info is None), refs, versions))
    raw_labels = np.concatenate([s.labels for s in shards])
    blob_starts = np.cumsum([0] + [len(s.key_bytes) for s in shards[:-1]])
    index = SampleIndex(
        uri=uri, shard_uris=[r.uri for r in refs], shard_versions=versions,
        shard=np.concatenate([np.full(len(s.offsets), i, np.int32) for i, s in enumerate(shards)]),
        offset=np.concatenate([s.offsets for s in shards]), size=np.concatenate([s.sizes for s in shards]),
        labels=None, key_bytes=np.frombuffer(b"".join(s.key_bytes for s in shards), np.uint8),
        key_ends=np.concatenate([s.key_ends + start for s, start in zip(shards, blob_starts.tolist())]),
        classes=[], channels=3, image_size=None)
    repeat = _repeated_key(index) if unique_keys else None
    if repeat is not None:
        where = [index.shard_uris[int(index.shard[i])] for i in repeat]
        raise UserError(f"{uri}: sample key {index.key(repeat[0])!r} appears twice (in {where[0]}"
                        f"{' and ' + where[1] if where[1] != where[0] else ''}); keys name samples, so they must be "
                        f"unique (`unsupft ingest {uri} OUT_URI` writes a copy with unique keys)")
    if info is not None:
        index.classes, index.channels, index.image_size = info.classes, info.channels, info.image_size
        if info.labeled:
            bad = np.flatnonzero((raw_labels < 0) | (raw_labels >= len(info.classes)))
            if len(bad):
                raise CorruptShard(f"{uri}: sample {index.key(int(bad[0]))!r} has no label or one outside the "
                                   f"{len(info.classes)} classes")
            index.labels = raw_labels
        return index
    if shards[0].first_mode in GRAY_MODES:
        index.channels = 1
    missing = int((raw_labels < 0).sum())
    if 0 < missing < len(raw_labels):
        raise UserError(f"{uri}: {missing} of {len(raw_labels)} samples have no label (.cls or a json label field); "
                        f"label all or none")
    if missing == 0:
        ids = np.unique(raw_labels)
        index.classes, index.labels = [str(int(i)) for i in ids], np.searchsorted(ids, raw_labels).astype(np.int64)
    return index
