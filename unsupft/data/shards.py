"""WebDataset tar shards: writing a data set (reading is `unsupft.data.index` and `.samples`).

Shards are plain tar files that `webdataset` (and `tar`) read; each sample is `<key>.<ext>` (ext
`png`, `jpg` or `webp`) plus `<key>.cls` (the label id as ASCII) when labeled. Everything here goes
through `unsupft.store`, so the same code reads and writes local directories and S3 prefixes.

Keys are data, not paths: a key written here is a relative name without `..`, `.` or empty
components, backslashes or control characters (`unsafe_name`), so no tar tool extracts a shard
outside its folder. Members are POSIX.1-2001 (PAX) tar: names of any length (USTAR fits 100
characters, 255 split at a `/`) and in any script; a name of up to 100 ASCII characters is stored
exactly as USTAR stores it.

While an ingestion writes into a folder, `_INGESTING.json` marks it as unfinished; `dataset.json`,
written last, marks it complete, and the marker is removed after it. The marker is what tells
unsupft's partial output from foreign shards that happen to share its names (`shard-000000.tar`
is also `webdataset.ShardWriter`'s documented pattern). The marker also names every file the
ingestion writes, before it writes it, so what a later ingestion deletes is only what unsupft wrote
there: the files an old manifest lists and those a killed run's marker names, never a user's file
that happens to carry a shard name.
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
from typing import IO, Any, Callable, Iterable, Sequence

from unsupft import store
from unsupft.data.info import FORMAT, INFO_NAME, INGESTING_NAME, ShardInfo
from unsupft.errors import UserError

# The names `write_datasets` owns directly below a data set's URI: its shards and its sources file,
# with the generation token an overwrite adds ("shard-1f2e3d4c-000000.tar").
SHARD_NAME = re.compile(r"shard-([0-9a-f]{8}-)?\d{6}\.tar")
_OWNED_NAME = re.compile(rf"{SHARD_NAME.pattern}|sources(-[0-9a-f]{{8}})?\.tsv")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LONGEST_PART = 200  # bytes of one path component: with `.png`, `~2`, a temp prefix, inside 255


@dataclass(frozen=True)
class Sample:
    """One encoded image to write: `data` in the format `ext` names; `source` is its provenance
    (a path relative to the source folder, or the key in the source shards that `key` rewrites),
    None when there is none to record."""

    key: str
    data: bytes
    ext: str
    label: int | None
    source: str | None = None


def unsafe_name(key: str) -> str | None:
    """What keeps `key` from being the start of a member name that every tar tool extracts inside
    its folder and every file system stores (None: nothing). Foreign shards may carry any key."""
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is absolute"
    if "\\" in key:
        return "it holds a backslash"
    if _CONTROL.search(key):
        return "it holds a control character"
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "it holds an empty, '.' or '..' path component"
    if any(len(part.encode()) > _LONGEST_PART for part in parts):
        return f"a path component is longer than {_LONGEST_PART} bytes"
    return None


def safe_name(key: str) -> str:
    """The nearest key that `unsafe_name` passes: the key's path components without empty, `.`
    and `..` ones, control characters and backslashes as `_` (`../../victim/k3` -> `victim/k3`,
    `/x/k3` -> `x/k3`), each cut to its first 200 bytes; the last component without dots, so
    WebDataset reads the same key back."""
    parts = [_CONTROL.sub("_", part).replace("\\", "_").encode()[:_LONGEST_PART].decode("utf-8", "ignore")
             for part in key.split("/") if part not in ("", ".", "..")]
    if parts:
        parts[-1] = parts[-1].replace(".", "_")
    return "/".join(parts) or "_"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)  # mtime 0, no owner names: what `written_by_unsupft` recognises
    member.size = len(data)
    member.mode = 0o444
    tar.addfile(member, io.BytesIO(data))


def written_by_unsupft(shard_uri: str) -> bool:
    """Whether the shard's first header is one `_add_member` writes (mode 0444, mtime 0, no user or
    group name; `webdataset` writes the time and "bigdata"): how the shards an ingestion left before
    unsupft wrote `_INGESTING.json` markers are told from foreign shards of the same names."""
    try:
        first = tarfile.TarInfo.frombuf(store.read_range(shard_uri, 0, tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return (first.mode, first.mtime, first.uname, first.gname) == (0o444, 0, "", "")


class _ShardBuilder:
    """One shard being built in an anonymous temp file, sample by sample (memory: one sample)."""

    def __init__(self, name: str, labeled: bool) -> None:
        self.name, self.labeled, self.samples = name, labeled, 0
        self.file = tempfile.TemporaryFile()
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, sample: Sample) -> None:
        _add_member(self.tar, f"{sample.key}.{sample.ext}", sample.data)
        if self.labeled:
            _add_member(self.tar, f"{sample.key}.cls", str(sample.label).encode("ascii"))
        self.samples += 1

    def upload(self, put: Callable[[str, IO[bytes]], None]) -> ShardInfo:
        """Close the tar and store it through `put(name, stream)`; its entry in the manifest."""
        self.tar.close()
        digest = hashlib.sha256()
        self.file.seek(0)
        for chunk in iter(lambda: self.file.read(1 << 20), b""):
            digest.update(chunk)
        self.file.seek(0)
        put(self.name, self.file)
        self.file.close()
        return ShardInfo(self.name, self.samples, digest.hexdigest())


@dataclass(frozen=True)
class Part:
    """One data set to write: where, its samples, and its image size (None: the images differ; a
    callable gives it once every sample is written, for a source that learns sizes by streaming)."""

    out: str
    samples: Iterable[Sample]
    image_size: tuple[int, int] | None | Callable[[], tuple[int, int] | None]


@dataclass
class _Folder:
    """What an output folder holds before an ingestion writes into it."""

    uri: str
    complete: bool  # dataset.json is there
    unfinished: bool  # _INGESTING.json is there: an ingestion into it did not finish
    foreign: list[str]  # names unsupft writes, held by files unsupft did not write

    @classmethod
    def look(cls, uri: str) -> "_Folder":
        names = store.list_prefix(uri)
        complete, unfinished = INFO_NAME in names, INGESTING_NAME in names
        owned = [n for n in names if _OWNED_NAME.fullmatch(n)]
        shards = [n for n in owned if SHARD_NAME.fullmatch(n)]
        # without either file, only the shards of an ingestion killed before markers existed are unsupft's
        ours = complete or unfinished or (bool(shards) and written_by_unsupft(store.join(uri, shards[0])))
        return cls(uri, complete, unfinished, [] if ours else owned)


def check_outputs(uris: Sequence[str], overwrite: bool) -> bool:
    """Refuse, before anything is read or written, the outputs an ingestion must not write into:
    a complete data set (unless `overwrite`), and a folder holding files of the names it writes
    that unsupft did not write (foreign `shard-000000.tar`, a user's `sources.tsv`): they would be
    replaced or deleted. `uris` are the parts of one ingestion (train/ and test/ of a split); when
    any part holds the marker of an ingestion that did not finish, all parts are written again,
    complete ones included, so a split stopped between its parts never blocks its rerun.
    Returns whether that is the case."""
    folders = [_Folder.look(store.normalize(uri)) for uri in uris]
    unfinished = any(f.unfinished for f in folders)
    for folder in folders:
        if folder.foreign:
            raise UserError(f"{folder.uri}: holds {folder.foreign[0]}, which unsupft did not write "
                            f"(no {INFO_NAME} or {INGESTING_NAME}); ingest into another folder")
        if folder.complete and not overwrite and not unfinished:
            incomplete = [f.uri for f in folders if not f.complete]
            also = f"; {incomplete[0]} does not (a split ingestion that did not finish?)" if incomplete else ""
            raise UserError(f"{folder.uri}: holds a complete data set already{also} (add --overwrite to replace it)")
    return unfinished


class _Writing:
    """One data set being written: the files this ingestion put there, its marker, its manifest."""

    def __init__(self, out: str) -> None:
        self.out = store.normalize(out)
        self.token = f"-{secrets.token_hex(4)}" if store.exists(store.join(self.out, INFO_NAME)) else ""
        self.marker = store.join(self.out, INGESTING_NAME)
        self.had_marker = store.exists(self.marker)  # a killed run's leftovers: the next success removes them
        # what unsupft wrote here before: the old set's files and a killed run's (its marker names them)
        self.earlier = _listed_files(self.out) + (_marker_files(self.marker) if self.had_marker else [])
        self.written: list[str] = []
        self.shards: list[ShardInfo] = []
        self.manifest: dict[str, Any] | None = None  # set once written

    def put(self, name: str, stream: IO[bytes]) -> None:
        """Store one file below the data set, named in the marker first (so a kill at any moment
        leaves no file of ours that the marker does not name)."""
        self.written.append(name)
        store.write_json(self.marker, {"format": "unsupft-ingesting/1",
                                       "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                       "files": sorted({*self.earlier, *self.written})})
        store.upload_stream(store.join(self.out, name), stream)

    def write_samples(self, samples: Iterable[Sample], labeled: bool, shard_size: int) -> bool:
        """Every sample into shards of `shard_size`, then `sources.tsv` when samples carry a
        source; whether they did."""
        with io.TextIOWrapper(tempfile.TemporaryFile(), encoding="utf-8", newline="") as sources_text:
            sources_rows = csv.writer(sources_text, delimiter="\t", lineterminator="\n")
            has_sources = False
            shard: _ShardBuilder | None = None
            for sample in samples:
                if shard is None:
                    shard = _ShardBuilder(f"shard{self.token}-{len(self.shards):06d}.tar", labeled)
                shard.add(sample)
                if sample.source is not None:
                    sources_rows.writerow([sample.key, sample.source])
                    has_sources = True
                if shard.samples == shard_size:
                    self.shards.append(shard.upload(self.put))
                    shard = None
            if shard is not None:
                self.shards.append(shard.upload(self.put))
            if not self.shards:
                raise UserError(f"{self.out}: no samples to write (check --classes/--limit/--split)")
            if has_sources:
                sources_text.flush()
                sources_text.buffer.seek(0)
                self.put(f"sources{self.token}.tsv", sources_text.buffer)
        return has_sources

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        store.write_json(store.join(self.out, INFO_NAME), manifest)
        self.manifest = manifest

    def abandon(self, keep_marker: bool) -> None:
        """After a failure: delete what this run wrote unless its manifest lists it, and the marker it
        wrote unless `keep_marker` (another part's new manifest is out: the rerun must write all)."""
        if self.manifest is None:
            for name in self.written:
                store.delete(store.join(self.out, name))
        if not keep_marker and not self.had_marker and self.written:
            store.delete(self.marker)

    def finish(self) -> None:
        """Remove what unsupft wrote here before that the new manifest does not list (the old set's
        files, a killed run's), then the marker."""
        for name in sorted(set(self.earlier) - set(self.written)):
            if _OWNED_NAME.fullmatch(name):
                store.delete(store.join(self.out, name))
        store.delete(self.marker)


def _listed_files(out: str) -> list[str]:
    """The shard and sources files the data set at `out` lists (none without a `dataset.json`)."""
    info = store.join(out, INFO_NAME)
    try:
        manifest = store.read_json(info) if store.exists(info) else {}
        names = [shard["name"] for shard in manifest.get("shards", [])] + [manifest.get("sources")]
    except (UserError, AttributeError, KeyError, TypeError):  # a damaged manifest: delete nothing it may name
        return []
    return [name for name in names if isinstance(name, str)]


def _marker_files(marker: str) -> list[str]:
    """The files a killed ingestion's marker names (a marker of an older unsupft names none)."""
    files = store.read_json(marker).get("files", [])
    return [name for name in files if isinstance(name, str)]


def write_datasets(parts: Sequence[Part], *, classes: list[str], labeled: bool, channels: int, source: str,
                   shard_size: int) -> list[dict[str, Any]]:
    """Write each part's samples as shards of `shard_size` under its `out`, then every part's
    `dataset.json`; returns the manifests. The caller has run `check_outputs` first.

    The manifests are written only once every part's shards are in place, so the train/ and test/
    of a split become complete together (a kill between the two manifest writes leaves the marker,
    and `check_outputs` lets the rerun write both again). A data set already at `out` stays
    complete and readable until the new manifest replaces it in one atomic write: the new files get
    names the old manifest does not use (a fresh generation token), and only then are the old ones
    deleted. If writing fails, the files this call wrote are deleted and the old data sets are
    untouched. Shards are built in anonymous temp files (no name in $TMPDIR, so a killed ingestion
    leaves nothing there) and uploaded whole (atomic in the store). A `sources.tsv` (key, source
    path) is written beside the manifest when samples carry a source. Files left below `out` by a
    killed earlier ingestion (the owned shard/sources names no manifest lists) are removed at the end.
    """
    writing = [_Writing(part.out) for part in parts]
    try:
        has_sources = [w.write_samples(part.samples, labeled, shard_size) for w, part in zip(writing, parts)]
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for w, part, sources in zip(writing, parts, has_sources):
            image_size = part.image_size() if callable(part.image_size) else part.image_size
            w.write_manifest({
                "format": FORMAT,
                "samples": sum(s.samples for s in w.shards),
                "classes": classes,
                "labeled": labeled,
                "image_size": list(image_size) if image_size is not None else None,
                "channels": channels,
                "shards": [{"name": s.name, "samples": s.samples, "sha256": s.sha256} for s in w.shards],
                "source": source,
                "created": created,
                **({"sources": f"sources{w.token}.tsv"} if sources else {}),
            })
    except BaseException:
        committed = any(w.manifest is not None for w in writing)
        for w in writing:
            w.abandon(keep_marker=committed)
        raise
    for w in writing:
        w.finish()
    return [w.manifest for w in writing]


def write_dataset(out: str, samples: Iterable[Sample], *, classes: list[str], labeled: bool, channels: int,
                  image_size: tuple[int, int] | None | Callable[[], tuple[int, int] | None], source: str,
                  shard_size: int) -> dict[str, Any]:
    """One data set: `write_datasets` of the single part at `out`; returns its manifest."""
    return write_datasets([Part(out, samples, image_size)], classes=classes, labeled=labeled, channels=channels,
                          source=source, shard_size=shard_size)[0]


class CorruptShard(UserError):
    """A shard or one of its members cannot be read; the message names the shard and the key."""
