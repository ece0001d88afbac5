"""Scoring a model's own classifier on a labeled test set, streamed batch by batch.

`transfer --test` and `evaluate` (for a `model.pt` that carries a classifier) both answer "how good
is my finetuned model" the same way: the test images are read lazily (`Fitted` through
`batches_of`), each batch's predictions go straight into a C x C confusion matrix, and every number
of the score is read off that matrix. Memory is the matrix, not the test set.

    labels = labels_in_classes(classes, test, "the train set")  # test labels as ids of `classes`, by name
    score = score_classifier(model, Fitted(test, size), labels, classes)
    score["top1"], score["mean_class"], score["per_class"]["7"], score["confusion"][true][predicted]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from unsupft.data.samples import Samples, batches_of
from unsupft.errors import UserError
from unsupft.preprocess import preprocess
from unsupft.models.io import classifier_layer


def labels_in_classes(classes: Sequence[str], test: Samples, owner: str) -> np.ndarray:
    """The test set's labels as positions in `classes`, matched by class name: a test class that
    `owner` (the train set, a model) does not know is one line naming it, since a score against
    other names would mean nothing."""
    if test.labels is None:
        raise UserError(f"{test.uri}: scoring needs a labeled test set")
    present = [test.classes[c] for c in np.unique(test.labels.numpy())]
    missing = [name for name in present if name not in classes]
    if missing:
        raise UserError(f"{test.uri}: test classes {missing} are not in {owner} "
                        f"(classes {', '.join(classes)})")
    to_classes = np.array([list(classes).index(n) if n in classes else -1 for n in test.classes], dtype=np.int64)
    return to_classes[test.labels.numpy()]


def align_test_labels(train: Samples, test: Samples) -> torch.Tensor:
    """The test labels in the train set's class ids (matched by class name)."""
    for data in (train, test):
        if data.labels is None:
            raise UserError(f"{data.uri}: evaluation needs a labeled data set")
    train_classes = train.classes
    present = set(np.unique(train.labels.numpy()).tolist())
    test_names = [test.classes[c] for c in np.unique(test.labels.numpy())]
    missing = [n for n in test_names if n not in train_classes or train_classes.index(n) not in present]
    if missing:
        raise UserError(f"{test.uri}: test classes {missing} are not in the train set {train.uri}")
    to_train = torch.tensor([train_classes.index(n) if n in train_classes else -1 for n in test.classes])
    return to_train[test.labels]


def with_classifier(backbone: nn.Module, classifier: dict[str, torch.Tensor]) -> nn.Module:
    """The backbone followed by the linear classifier a `model.pt` carries ({"weight", "bias"})."""
    return nn.Sequential(backbone, classifier_layer(classifier))


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] (int64 [C, C]) of one batch; add the batches' matrices up."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return counts


def scores_from_confusion(confusion: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1, mean-class and per-class accuracy of a confusion matrix (rows: true class).

    Mean-class averages over the classes present in the test set (rows with samples), as
    `unsupft.eval.metrics.mean_class_accuracy` does; per-class accuracy is given for those classes."""
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1)
    present = np.flatnonzero(totals)
    per_class = {classes[c]: float(confusion[c, c] / totals[c]) for c in present}
    return {
        "top1": float(np.trace(confusion) / max(1, totals.sum())),
        "mean_class": float(np.mean(list(per_class.values()))) if per_class else 0.0,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
        "test_samples": int(totals.sum()),
    }


@torch.no_grad()
def score_classifier(model: nn.Module, images: Dataset | torch.Tensor, labels: np.ndarray, classes: Sequence[str],
                     image_size: Sequence[int] | None = None, batch_size: int = 256) -> dict[str, Any]:
    """`scores_from_confusion` of `model` (images -> logits over `classes`, put in eval mode) on
    `images` (uint8 [N, C, H, W], lazy or in memory) with true class ids `labels` [N]. Batches are
    read in order, predicted and counted, then dropped."""
    device = next(model.parameters()).device
    model.eval()
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    start = 0
    for batch in batches_of(images, batch_size):
        predicted = model(preprocess(batch, image_size).to(device)).argmax(1).cpu().numpy()
        confusion += confusion_matrix(predicted, labels[start:start + len(predicted)], len(classes))
        start += len(predicted)
    return scores_from_confusion(confusion, classes)


def summary_of(score: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a score that fit a manifest line (no confusion matrix)."""
    return {key: score[key] for key in ("top1", "mean_class", "per_class", "test_samples")}
