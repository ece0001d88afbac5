"""`unsupft ingest SOURCE OUT_URI`: turn a data set into WebDataset shards plus `dataset.json`.

Selection happens on indices before any pixel is written: keep `--classes` (labels renumbered
0..k-1 in the source's class order), shuffle with `--seed`, cut to `--limit`, then optionally split
per class into `OUT_URI/train` and `OUT_URI/test`. Shards hold the samples in that shuffled order,
so even a small shuffle buffer sees all classes. How each image is stored (kept as it is, turned
upright, shrunk, re-encoded) is `unsupft.data.encode`'s business.

WebDataset shards (an unsupft data set, a `.tar`, a folder or S3 prefix of tars, a brace pattern)
are read through the sample index, the same way the stages read them: selection works on the
index's label array, and each kept image member is copied as its very bytes (one pread or ranged
GET each), so nothing is decoded and memory holds the index, never the images. Their keys are
data: one that is unsafe as a member name (`../../x/k`, `/x/k`) or that appears twice is rewritten
(`unique_keys`), said in one line, and listed with its key in SOURCE in `sources.tsv`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import click
import numpy as np
from PIL import Image

from unsupft import options, store
from unsupft.data.encode import (DEFAULT_QUALITY, FORMATS, KEEP, Encoding, UnreadableImage, encode_array, encode_bytes,
                                  encode_file, stored_size)
from unsupft.data.index import SampleIndex, open_index
from unsupft.data.samples import Samples, image_format
from unsupft.data.shards import CorruptShard, Part, Sample, check_outputs, safe_name, unsafe_name, write_datasets
from unsupft.data.sources import SourceData, is_shard_source, open_source
from unsupft.errors import UserError


@dataclass(frozen=True, kw_only=True)
class IngestConfig(options.Options):
    """The options of `unsupft ingest` (its command is `unsupft.stages.ingest`): declared here, so
    that `ingest` takes them whole and the library still imports no stage."""

    source: str = options.option(argument=True)
    out_uri: str = options.option(argument=True)
    labels_file: str | None = options.option(None, flag="--labels", metavar="FILE",
                                             help="IDX labels file for an IDX image SOURCE (gzip or not).")
    test_fraction: float | None = options.option(
        None, flag="--split", type=float, metavar="FRACTION",
        help="Share of each class that goes to OUT_URI/test; the rest goes to OUT_URI/train.")
    classes: str | None = options.option(None, metavar="LIST",
                                         help="Comma list of class names or ids to keep (renumbered 0..k-1).")
    limit: int | None = options.option(None, type=click.IntRange(min=1),
                                       help="Keep at most this many samples (a seeded random subset).")
    shard_size: int = options.option(10000, type=click.IntRange(min=1), help="Samples per shard.")
    unlabeled: bool = options.option(False, is_flag=True, help="Drop the labels (an unlabeled data set).")
    seed: int = options.option(0, type=options.SEED, help="Seed of the subset, order and split.")
    resize: int | None = options.option(
        None, type=int, metavar="SHORT_SIDE",
        help="Shrink images whose short side is longer to SHORT_SIDE pixels, keeping the aspect ratio.")
    fmt: str = options.option(
        KEEP, flag="--format", metavar="[keep|jpg|png|webp]",
        help="Stored image format; keep: a JPEG/PNG/WebP file stays in its format (its very bytes when "
             "it needs no change), arrays and other formats become PNG.")
    quality: int = options.option(DEFAULT_QUALITY, type=int, help="JPEG/WebP quality of re-encoded images (1..100).")
    skip_corrupt: bool = options.option(
        False, is_flag=True, help="Leave out unreadable image files (counted and named) instead of stopping at the first.")
    overwrite: bool = options.option(
        False, is_flag=True, help="Replace a complete data set at OUT_URI (it stays readable until the new one is complete).")


def resolve_classes(requested: str, classes: list[str]) -> list[int]:
    """Class ids for a comma list of class names or ids, in the source's class order."""
    ids = set()
    for token in (t.strip() for t in requested.split(",")):
        if token in classes:
            ids.add(classes.index(token))
        elif token.isdigit() and int(token) < len(classes):
            ids.add(int(token))
        else:
            raise UserError(f"--classes: unknown class {token!r} (classes: {', '.join(classes)})")
    return sorted(ids)


def select(source: SourceData | SampleIndex, *, class_ids: list[int] | None, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the kept samples, in a seeded random order."""
    indices = np.arange(len(source))
    if class_ids is not None:
        indices = indices[np.isin(source.labels, class_ids)]
    indices = np.random.default_rng(seed).permutation(indices)
    return indices[:limit] if limit is not None else indices


def split(indices: np.ndarray, labels: np.ndarray | None, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) with about `test_fraction` of every class in test, both in `indices` order."""
    rng = np.random.default_rng([seed, 1])
    groups = [indices] if labels is None else [indices[labels[indices] == c] for c in np.unique(labels[indices])]
    test = set()
    for group in groups:
        count = int(round(test_fraction * len(group)))
        test.update(rng.choice(group, size=count, replace=False).tolist())
    is_test = np.array([i in test for i in indices], dtype=bool)
    return indices[~is_test], indices[is_test]


def _samples(source: SourceData, indices: np.ndarray, label_map: dict[int, int] | None, encoding: Encoding,
             skipped: list[Path] | None) -> Iterator[Sample]:
    """The samples at `indices`, encoded; unreadable files go to `skipped` if given, else raise."""
    for i in indices:
        label = None if label_map is None else label_map[int(source.labels[i])]
        image = source.image(int(i))
        if isinstance(image, Path):
            try:
                data, ext = encode_file(image, encoding)
            except UnreadableImage:
                if skipped is None:
                    raise
                skipped.append(image)
                continue
            origin = image.relative_to(source.root).as_posix()
        else:
            (data, ext), origin = encode_array(image, encoding), None
        yield Sample(key=source.keys[i], data=data, ext=ext, label=label, source=origin)


def unique_keys(keys: Sequence[str]) -> dict[int, tuple[str, str]]:
    """{position: (new key, why)} for the keys a shard written by unsupft cannot carry as they are:
    one that is unsafe as a member name becomes its `safe_name`, and one that is taken (a repeat,
    or a rewrite landing on another sample's key) gets the first free `~2`, `~3`, ... Decided by the
    source's keys in index order alone, so every rerun, `--limit` or `--split` gives a sample the
    same key, and a key that needs no change is never taken from its sample."""
    kept = {key for key in keys if unsafe_name(key) is None}
    taken: set[str] = set()
    renamed: dict[int, tuple[str, str]] = {}
    for i, key in enumerate(keys):
        if key in kept and key not in taken:
            taken.add(key)
            continue
        base = key if key in kept else safe_name(key)
        new, count = base, 1
        while new in taken or new in kept:
            count += 1
            new = f"{base}~{count}"
        taken.add(new)
        renamed[i] = (new, "it appears twice" if key in kept else unsafe_name(key))
    return renamed


def _copied(stored: Samples, indices: np.ndarray, label_map: dict[int, int] | None, encoding: Encoding,
            sizes: set[tuple[int, int]], renamed: dict[int, tuple[str, str]]) -> Iterator[Sample]:
    """The shard samples at `indices`: each image member's very bytes, or one re-encode when
    --resize/--format ask for it; the stored (H, W) of each, read from its header, goes to `sizes`.
    A key in `renamed` is written as its new key, with its key in SOURCE as the sample's source."""
    copy = encoding.fmt == KEEP and encoding.short_side is None
    for i in (int(i) for i in indices):
        key = stored.key(i)
        where = f"{stored.index.shard_uris[int(stored.index.shard[i])]}: sample {key!r}"
        data = stored.encoded(i)
        if copy:
            ext = image_format(data)
            if ext is None:
                raise CorruptShard(f"{where}: not a JPEG, PNG or WebP image")
        else:
            data, ext = encode_bytes(data, where, encoding)
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                sizes.add((img.height, img.width))
        except (OSError, ValueError, SyntaxError) as exc:
            raise CorruptShard(f"{where}: unreadable image ({exc})") from exc
        label = None if label_map is None else label_map[int(stored.index.labels[i])]
        if i in renamed:
            yield Sample(key=renamed[i][0], data=data, ext=ext, label=label, source=key)
        else:
            yield Sample(key=key, data=data, ext=ext, label=label)


def _only_size(sizes: set[tuple[int, int]]) -> tuple[int, int] | None:
    """The one (H, W) of `sizes`, None when the images differ."""
    return next(iter(sizes)) if len(sizes) == 1 else None


def common_size(sizes: np.ndarray, short_side: int | None) -> tuple[int, int] | None:
    """The stored (H, W) all these images share, or None when they differ (photos usually do)."""
    return _only_size({stored_size(int(h), int(w), short_side) for h, w in np.unique(sizes, axis=0)})


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the pod, a kill) unwinds like an error, so half-written files are
    deleted; SIGKILL leaves them to the next ingestion into the same place. Only the main thread
    may set handlers: called from another thread, SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_options(config: IngestConfig) -> None:
    """Refuse bad option values with one line, before anything is read or written."""
    if config.test_fraction is not None and not 0.0 < config.test_fraction < 1.0:
        raise UserError(f"--split: {config.test_fraction} is not a fraction strictly between 0 and 1")
    if config.resize is not None and config.resize < 1:
        raise UserError(f"--resize: {config.resize} is not a positive number of pixels (the short side after resizing)")
    if config.fmt not in (KEEP, *FORMATS):
        raise UserError(f"--format: {config.fmt!r} is not one of {', '.join((KEEP, *FORMATS))}")
    if not 1 <= config.quality <= 100:
        raise UserError(f"--quality: {config.quality} is not in 1..100")


def ingest(config: IngestConfig) -> None:
    """Write `config.source` as WebDataset shards plus dataset.json under `config.out_uri` (or its
    train/ and test/ halves with `--split`)."""
    check_options(config)
    source, test_fraction = config.source, config.test_fraction
    out_uri = store.normalize(config.out_uri)
    part_uris = [out_uri] if test_fraction is None else [store.join(out_uri, "train"), store.join(out_uri, "test")]
    unfinished = check_outputs(part_uris, config.overwrite)
    stored, data, renamed = None, None, {}
    if is_shard_source(source):
        if config.labels_file is not None:
            raise UserError(f"{source}: --labels is for IDX image files only, not shards")
        stored = Samples(open_index(source, unique_keys=False))
        renamed = unique_keys(stored.keys())
        selectable, labels, all_classes, channels = stored.index, stored.index.labels, stored.classes, stored.channels
    else:
        data = open_source(source, config.labels_file, skip_unreadable=config.skip_corrupt)
        selectable, labels, all_classes, channels = data, data.labels, data.classes, data.channels
    labeled = labels is not None
    if config.classes is not None and not labeled:
        raise UserError(f"--classes: {source} has no labels to select classes by")
    class_ids = resolve_classes(config.classes, all_classes) if config.classes is not None else None
    indices = select(selectable, class_ids=class_ids, limit=config.limit, seed=config.seed)
    kept = class_ids if class_ids is not None else list(range(len(all_classes)))
    label_map = {old: new for new, old in enumerate(kept)} if labeled and not config.unlabeled else None
    names = [all_classes[c] for c in kept] if label_map is not None else []
    halves = [indices] if test_fraction is None else split(indices, labels, test_fraction, config.seed)
    parts = dict(zip(part_uris, halves))
    for uri, part in parts.items():
        if len(part) == 0:
            raise UserError(f"{uri}: would be empty (check --classes/--limit/--split)")
    options = " ".join(f"{flag} {value}" for flag, value in (
        ("--labels", config.labels_file), ("--classes", config.classes), ("--limit", config.limit),
        ("--split", test_fraction), ("--seed", config.seed), ("--resize", config.resize),
        ("--format", config.fmt if config.fmt != KEEP else None)) if value is not None)
    encoding = Encoding(fmt=config.fmt, short_side=config.resize, quality=config.quality, channels=channels)
    skipped = list(data.unreadable) if config.skip_corrupt and data is not None else None
    if unfinished:
        click.echo(f"{out_uri}: an earlier ingestion into it did not finish; writing it again", file=sys.stderr)
    rewritten = [int(i) for i in indices if int(i) in renamed] if renamed else []
    if rewritten:
        old_key, (new_key, why) = stored.key(rewritten[0]), renamed[rewritten[0]]
        click.echo(f"{source}: rewrote {len(rewritten)} sample keys that are unsafe as member names or repeated "
                   f"(first: {old_key!r} -> {new_key!r}, {why}); sources.tsv lists each with its key in SOURCE",
                   file=sys.stderr)
    writes = []
    for uri, part in parts.items():
        if stored is not None:
            sizes: set[tuple[int, int]] = set()
            writes.append(Part(uri, _copied(stored, part, label_map, encoding, sizes, renamed),
                               functools.partial(_only_size, sizes)))
        else:
            writes.append(Part(uri, _samples(data, part, label_map, encoding, skipped),
                               common_size(data.sizes[part], config.resize)))
    with _sigterm_exits():
        manifests = write_datasets(writes, classes=names, labeled=label_map is not None, channels=channels,
                                   shard_size=config.shard_size,
                                   source=f"{source} {options}{' --unlabeled' if config.unlabeled else ''}".strip())
    for uri, manifest in zip(parts, manifests):
        click.echo(f"{uri}: {manifest['samples']} samples in {len(manifest['shards'])} shards", file=sys.stderr)
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable image files (first: {skipped[0]})", file=sys.stderr)
