"""`unsupft ingest SOURCE OUT_URI`: the command of `unsupft.data.ingest` (its options, what it
reads and how it writes shards are declared and described there)."""

from __future__ import annotations

import click

from unsupft import options
from unsupft.data.ingest import IngestConfig, ingest
from unsupft.errors import report_user_errors


@click.command("ingest")
@options.options_from(IngestConfig)
@report_user_errors
def ingest_command(config: IngestConfig) -> None:
    """Write SOURCE as WebDataset shards plus dataset.json under OUT_URI.

    SOURCE is a folder of class sub-folders of images (or a flat folder of images: unlabeled), an
    IDX image file (with --labels), an .npz (arrays images/x, labels/y, optional class_names) or
    sklearn:digits (8x8, kept at native size), or WebDataset shards: an unsupft data set, a .tar, a
    folder or S3 prefix of tars, a brace pattern (images copied byte for byte; classes from their .cls
    or .json labels; a key that is unsafe as a file name or appears twice is rewritten, said in one
    line). A folder's file paths, and the rewritten keys' originals, are kept in sources.tsv.
    """
    ingest(config)
