"""Which labeled samples a transfer run trains on: K per class drawn reproducibly, or a key list.

Both return indices into a loaded data set, so the stage and the evaluation take the same subset
for the same (data, K, seed), and the label stage can hand over exactly the keys it collected;
`select_training_set` is the choice `transfer` and `semi` make between them.
"""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np
import torch

from unsupft import store
from unsupft.data.samples import Samples
from unsupft.errors import UserError


def draw_shots(labels: Sequence[int], shots: int, seed: int, classes: Sequence[str]) -> np.ndarray:
    """Sorted indices of exactly `shots` samples per class, the same for the same (labels, shots, seed).

    Each class draws from its own generator seeded by (seed, class id), so one class's draw does
    not change when another class gains samples. A class with fewer than `shots` samples is a
    `UserError` naming it.
    """
    labels = np.asarray(labels)
    if shots < 1:
        raise UserError(f"--shots must be at least 1 (got {shots})")
    chosen = []
    for c, name in enumerate(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise UserError(f"class '{name}' has only {len(members)} labeled samples, fewer than --shots {shots}")
        rng = np.random.default_rng([seed, c])
        chosen.append(rng.choice(members, shots, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def read_label_list(uri: str, keys: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices, labels or None) of the samples named in a key list file.

    The file is a CSV or plain text: one key per line, or a header `key,label` (label = class name
    or class id) whose labels then override the ones in the shards (this is how the manual
    annotator's answers reach training). Unknown keys and unknown classes are `UserError`s.
    """
    text = store.read_text(uri)
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(cell.strip() for cell in r)]
    if not rows:
        raise UserError(f"{uri}: the label list is empty")
    header = [cell.strip().lower() for cell in rows[0]]
    has_header = "key" in header
    key_col = header.index("key") if has_header else 0
    label_col = header.index("label") if has_header and "label" in header else None
    position = {k: i for i, k in enumerate(keys)}
    class_id = {name: i for i, name in enumerate(classes)}
    indices, labels = [], []
    for line, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        key = row[key_col].strip()
        if key not in position:
            raise UserError(f"{uri}:{line}: key '{key}' is not in the training data")
        indices.append(position[key])
        if label_col is not None:
            value = row[label_col].strip() if label_col < len(row) else ""
            if value in class_id:
                labels.append(class_id[value])
            elif value.isdigit() and int(value) < len(classes):
                labels.append(int(value))
            else:
                raise UserError(f"{uri}:{line}: label '{value}' is not one of the classes {list(classes)}")
    if len(set(indices)) != len(indices):
        raise UserError(f"{uri}: a key is listed twice")
    return np.asarray(indices, dtype=np.int64), (np.asarray(labels, dtype=np.int64) if label_col is not None else None)


def select_training_set(data: Samples, shots: int | None, seed: int,
                        labels_file: str | None) -> tuple[np.ndarray, torch.Tensor]:
    """(indices, labels) of the samples to train on: K per class, a key list, or every labeled one.
    Chosen from the index's labels and keys: no image is decoded."""
    if shots is not None and labels_file is not None:
        raise UserError("give either --shots or --labels, not both")
    classes = data.classes
    if labels_file is not None:
        indices, listed = read_label_list(labels_file, data.keys(), classes)
        if listed is not None:
            return indices, torch.as_tensor(listed)
        if data.labels is None:
            raise UserError(f"{data.uri}: unlabeled, and {labels_file} has no label column")
        return indices, data.labels[indices]
    if data.labels is None:
        raise UserError(f"{data.uri}: the data set has no labels (use --labels FILE with a label column)")
    indices = np.arange(len(data)) if shots is None else draw_shots(data.labels.numpy(), shots, seed, classes)
    return indices, data.labels[indices]
