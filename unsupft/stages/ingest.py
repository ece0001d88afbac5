"""`unsupft ingest SOURCE OUT_URI`: the command of `unsupft.data.ingest` (what it reads and how
it writes shards is described there)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import click

from unsupft import options
from unsupft.data.encode import DEFAULT_QUALITY, KEEP
from unsupft.data.ingest import ingest
from unsupft.errors import report_user_errors


@dataclass(frozen=True, kw_only=True)
class IngestConfig(options.Options):
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


@click.command("ingest")
@options.options_from(IngestConfig)
@report_user_errors
def ingest_command(config: IngestConfig) -> None:
    """Write SOURCE as WebDataset shards plus dataset.json under OUT_URI.

    SOURCE is a folder of class sub-folders of images (or a flat folder of images: unlabeled), an
    IDX image file (with --labels), an .npz (arrays images/x, labels/y, optional class_names) or
    sklearn:digits (8x8, kept at native size), or WebDataset shards: an unsupft data set, a .tar, a
    folder or S3 prefix of tars, a brace pattern (images copied byte for byte; classes from their .cls
    or .json labels). A folder's file paths are kept in sources.tsv.
    """
    ingest(**asdict(config))
