"""Who answers a round's labeling request: the shards themselves (`oracle`) or a person (`manual`).

A manual round is an exchange through the store, so that it works the same on a laptop and in a
cluster where the stage runs as a batch Job with nobody attached:

  <out>/requests/round-N.csv       columns `key` (the samples to label, in order), from round 1
                                   on `guess` (the previous round's model's class for it), and
                                   `image` when some key is no plain file name (below)
  <out>/requests/round-N/<key>.png the images, viewable in any file browser or S3 console
  <out>/requests/classes.json      the class names to choose from
  <out>/labels/round-N.csv         written by the person (or `unsupft annotate <out>`): key,label
                                   where label is a class name, or `?` for "not sure": that image
                                   goes back to the pool and costs no budget

Keys are data, not paths (a foreign shard's key may be `../../victim/k3`): an image is named
`<key>.png` only when the key is a plain relative name (letters, digits, `_`, `-`, `/` between
them: unsupft's own keys and most foreign ones); any other key gets a flat name, a readable part of
the key plus a hash of all of it (`victim_k3~1f2e3d4c5b6a7980.png`), that no other key shares and
that stays in the round's folder. `image_uri` is the one place that decides, for the stage and for
`unsupft annotate` alike, and the CSV's `image` column names those files for a person.

While the labels file is missing the stage stops with exit code 75 (`EXIT_WAITING_FOR_LABELS`); the
next attempt (`unsupft label --resume`, or the controller's retry) finds the file and goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

from unsupft import store
from unsupft.data.encode import Encoding, encode_array
from unsupft.errors import UserError


UNSURE = "?"
# a key that is its own image's name: relative components of portable characters, no dots (so no
# `..`, no hidden file, no folder that is also a `<key>.png`) and no `~` (which only hashed names hold)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_PLAIN_KEY_LENGTH = 150  # with `.png` and the store's temp prefix, well inside a file name's 255 bytes


class WaitingForLabels(Exception):
    """A manual round was requested and its labels file is not there yet."""

    def __init__(self, labels_uri: str, out: str) -> None:
        super().__init__(f"waiting for labels: put {labels_uri} (or run `unsupft annotate {out}`)")


class Annotator(Protocol):
    def annotate(self, round_index: int, keys: Sequence[str]) -> dict[str, int]:
        """Label ids (indices into the data set's classes) for `keys`; may raise WaitingForLabels."""


class OracleAnnotator:
    """Answers with the labels already stored in the shards (experiments, baselines)."""

    def __init__(self, keys: Sequence[str], labels: torch.Tensor | None) -> None:
        if labels is None:
            raise UserError("--annotator oracle needs a labeled data set (its shards carry no labels)")
        self.by_key = dict(zip(keys, labels.tolist()))

    def annotate(self, round_index: int, keys: Sequence[str]) -> dict[str, int]:
        return {k: int(self.by_key[k]) for k in keys}


def request_uri(out: str, round_index: int) -> str:
    return store.join(out, "requests", f"round-{round_index}.csv")


def labels_uri(out: str, round_index: int) -> str:
    return store.join(out, "labels", f"round-{round_index}.csv")


def image_name(key: str) -> str:
    """The file name of `key`'s image below `requests/round-N/` (see the module docstring):
    `<key>.png` for a plain key, else `<readable part>~<hash>.png`, flat and unique to the key."""
    if len(key) <= _PLAIN_KEY_LENGTH and _PLAIN_KEY.fullmatch(key):
        return f"{key}.png"
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_")[:64]
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{readable}~{digest}.png"


def image_uri(out: str, round_index: int, key: str) -> str:
    """Where `key`'s image of round `round_index` is stored: always inside that round's folder."""
    return store.join(out, "requests", f"round-{round_index}", image_name(key))


def classes_uri(out: str) -> str:
    return store.join(out, "requests", "classes.json")


def png_bytes(image: torch.Tensor) -> bytes:
    """A [C, H, W] uint8 tensor as PNG (ingestion's lossless encoding of arrays)."""
    pixels = image[0] if len(image) == 1 else image.permute(1, 2, 0)
    return encode_array(pixels.numpy(), Encoding())[0]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV file's text: `header`, then `rows`, each line ending in a plain newline."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def read_request(out: str, round_index: int) -> tuple[list[str], dict[str, str]]:
    """The round's keys in order, and the model's guesses for those that have one."""
    rows = list(csv.DictReader(io.StringIO(store.read_text(request_uri(out, round_index)))))
    return [row["key"] for row in rows], {row["key"]: row["guess"] for row in rows if row.get("guess")}


def read_requested_keys(out: str, round_index: int) -> list[str]:
    return read_request(out, round_index)[0]


def parse_labels(text: str, source: str, requested: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    """Validate a returned `key,label` file against the request; one-line errors naming the line.
    Keys answered `?` (unsure) count as answered and are left out of the result."""
    class_id = {name: i for i, name in enumerate(classes)}
    wanted = set(requested)
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["key", "label"]:
        raise UserError(f"{source}: line 1: header must be 'key,label', got {','.join(header)!r}")
    labels: dict[str, int] = {}
    unsure: set[str] = set()
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise UserError(f"{source}: line {line}: expected key,label, got {','.join(row)!r}")
        key, name = row[0].strip(), row[1].strip()
        if key not in wanted:
            raise UserError(f"{source}: line {line}: unknown key {key!r} (not requested this round)")
        if key in labels or key in unsure:
            raise UserError(f"{source}: line {line}: duplicate key {key!r}")
        if name == UNSURE and name not in class_id:
            unsure.add(key)
            continue
        if name not in class_id:
            raise UserError(f"{source}: line {line}: unknown class {name!r} (classes: {', '.join(classes)})")
        labels[key] = class_id[name]
    missing = [k for k in requested if k not in labels and k not in unsure]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{source}: missing keys {', '.join(missing[:3])}{more}")
    return labels


class ManualAnnotator:
    """Writes the round's request to the store and reads the person's answer from it.

    `guesses(round, keys)`, when given, returns the current model's class name per key (or None
    when there is no model with a classifier yet); the page pre-selects them."""

    def __init__(self, out: str, classes: Sequence[str], image_of: Callable[[str], torch.Tensor],
                 guesses: Callable[[int, Sequence[str]], dict[str, str] | None] | None = None) -> None:
        if not classes:
            raise UserError("--annotator manual needs class names (dataset.json has no classes)")
        self.out, self.classes, self.image_of, self.guesses = out, list(classes), image_of, guesses

    def annotate(self, round_index: int, keys: Sequence[str]) -> dict[str, int]:
        answer = labels_uri(self.out, round_index)
        if store.exists(answer):
            return parse_labels(store.read_text(answer), answer, keys, self.classes)
        self.write_request(round_index, keys)
        raise WaitingForLabels(answer, self.out)

    def write_request(self, round_index: int, keys: Sequence[str]) -> None:
        """Images and class names first, the CSV last: a request CSV is always complete."""
        for key in keys:
            store.write_bytes(image_uri(self.out, round_index, key), png_bytes(self.image_of(key)))
        store.write_text(classes_uri(self.out), json.dumps(self.classes))
        guesses = self.guesses(round_index, keys) if self.guesses else None
        named = any(image_name(k) != f"{k}.png" for k in keys)  # keys that cannot name their own file
        header = ["key"] + (["guess"] if guesses else []) + (["image"] if named else [])
        rows = ([k] + ([guesses[k]] if guesses else []) + ([image_name(k)] if named else []) for k in keys)
        store.write_text(request_uri(self.out, round_index), csv_text(header, rows))
