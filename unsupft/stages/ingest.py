"""`unsupft ingest SOURCE OUT_URI`: the command of `unsupft.data.ingest` (what it reads and how
it writes shards is described there)."""

from __future__ import annotations

import click

from unsupft import options
from unsupft.data.encode import DEFAULT_QUALITY, KEEP
from unsupft.data.ingest import ingest
from unsupft.errors import report_user_errors


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
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the subset, order and split.")
@click.option("--resize", type=int, metavar="SHORT_SIDE",
              help="Shrink images whose short side is longer to SHORT_SIDE pixels, keeping the aspect ratio.")
@click.option("--format", "fmt", default=KEEP, show_default=True, metavar="[keep|jpg|png|webp]",
              help="Stored image format; keep: a JPEG/PNG/WebP file stays in its format (its very bytes when "
                   "it needs no change), arrays and other formats become PNG.")
@click.option("--quality", type=int, default=DEFAULT_QUALITY, show_default=True,
              help="JPEG/WebP quality of re-encoded images (1..100).")
@click.option("--skip-corrupt", is_flag=True,
              help="Leave out unreadable image files (counted and named) instead of stopping at the first.")
@click.option("--overwrite", is_flag=True,
              help="Replace a complete data set at OUT_URI (it stays readable until the new one is complete).")
@report_user_errors
def ingest_command(source: str, out_uri: str, **ingest_options) -> None:
    """Write SOURCE as WebDataset shards plus dataset.json under OUT_URI.

    SOURCE is a folder of class sub-folders of images (or a flat folder of images: unlabeled), an
    IDX image file (with --labels), an .npz (arrays images/x, labels/y, optional class_names) or
    sklearn:digits (8x8, kept at native size), or WebDataset shards: an unsupft data set, a .tar, a
    folder or S3 prefix of tars, a brace pattern (images copied byte for byte; classes from their .cls
    or .json labels). A folder's file paths are kept in sources.tsv.
    """
    ingest(source, out_uri, **ingest_options)
