"""`unsupft ingest SOURCE OUT_URI`: turn a data set into WebDataset shards plus `dataset.json`.

Selection happens on indices before any pixel is written: keep `--classes` (labels renumbered
0..k-1 in the source's class order), shuffle with `--seed`, cut to `--limit`, then optionally split
per class into `OUT_URI/train` and `OUT_URI/test`. Shards hold the samples in that shuffled order,
so even a small shuffle buffer sees all classes.
"""

from __future__ import annotations

import sys

import click
import numpy as np

from unsupft import store
from unsupft.data.shards import Sample, write_dataset
from unsupft.data.sources import SourceData, open_source
from unsupft.errors import UserError, report_user_errors


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


def select(source: SourceData, *, class_ids: list[int] | None, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the kept samples, in a seeded random order."""
    indices = np.arange(len(source.keys))
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


def _samples(source: SourceData, indices: np.ndarray, label_map: dict[int, int] | None):
    for i in indices:
        label = None if label_map is None else label_map[int(source.labels[i])]
        yield Sample(key=source.keys[i], image=source.image(int(i)), label=label)


@click.command("ingest")
@click.argument("source")
@click.argument("out_uri")
@click.option("--labels", "labels_file", metavar="FILE", help="IDX labels file for an IDX image SOURCE (gzip or not).")
@click.option("--split", "test_fraction", type=float, metavar="FRACTION",
              help="Share of each class that goes to OUT_URI/test; the rest goes to OUT_URI/train.")
@click.option("--classes", metavar="LIST", help="Comma list of class names or ids to keep (renumbered 0..k-1).")
@click.option("--limit", type=click.IntRange(min=1), help="Keep at most this many samples (a seeded random subset).")
@click.option("--shard-size", type=click.IntRange(min=1), default=10000, show_default=True, help="Samples per shard.")
@click.option("--unlabeled", is_flag=True, help="Drop the labels (an unlabeled data set).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset, order and split.")
@report_user_errors
def ingest_command(source: str, out_uri: str, labels_file: str | None, test_fraction: float | None,
                   classes: str | None, limit: int | None, shard_size: int, unlabeled: bool, seed: int) -> None:
    """Write SOURCE as WebDataset shards plus dataset.json under OUT_URI.

    SOURCE is a folder of class sub-folders of images (or a flat folder of images: unlabeled), an
    IDX image file (with --labels), an .npz (arrays images/x, labels/y, optional class_names) or
    sklearn:digits (8x8, kept at native size).
    """
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise UserError(f"--split: {test_fraction} is not a fraction strictly between 0 and 1")
    out_uri = store.normalize(out_uri)
    data = open_source(source, labels_file)
    labeled = data.labels is not None
    if classes is not None and not labeled:
        raise UserError(f"--classes: {source} has no labels to select classes by")
    class_ids = resolve_classes(classes, data.classes) if classes is not None else None
    indices = select(data, class_ids=class_ids, limit=limit, seed=seed)
    kept = class_ids if class_ids is not None else list(range(len(data.classes)))
    label_map = {old: new for new, old in enumerate(kept)} if labeled and not unlabeled else None
    names = [data.classes[c] for c in kept] if label_map is not None else []
    if test_fraction is None:
        parts = {out_uri: indices}
    else:
        train, test = split(indices, data.labels, test_fraction, seed)
        parts = {store.join(out_uri, "train"): train, store.join(out_uri, "test"): test}
    for uri, part in parts.items():
        if len(part) == 0:
            raise UserError(f"{uri}: would be empty (check --classes/--limit/--split)")
    options = " ".join(f"{flag} {value}" for flag, value in (
        ("--labels", labels_file), ("--classes", classes), ("--limit", limit), ("--split", test_fraction),
        ("--seed", seed)) if value is not None)
    for uri, part in parts.items():
        info = write_dataset(
            uri, _samples(data, part, label_map), classes=names, labeled=label_map is not None,
            channels=data.channels, image_size=data.image_size,
            source=f"{source} {options}{' --unlabeled' if unlabeled else ''}".strip(), shard_size=shard_size,
        )
        click.echo(f"{uri}: {info.samples} samples in {len(info.shards)} shards", file=sys.stderr)
