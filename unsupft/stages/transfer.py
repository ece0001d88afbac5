"""`unsupft transfer`: supervised finetuning of a backbone on (few) labeled target images.

Inputs are read and checked before anything is written, so bad input (a missing `--init`, K
larger than a class, an unknown key in `--labels`) ends with one line, exit 2 and an untouched
`--out`. Outputs: `config.json`, `metrics.jsonl` (one line per epoch), `checkpoint.pt` (the training
loop's, every epoch: a rerun after a crash resumes from it; another config is refused, see unsupft.stage), `train_keys.txt`
(the keys trained on, for reproducibility), `model.pt` (backbone + classifier + classes), `_DONE.json`.
With `--test URI`, the finetuned model's score on that labeled set (top-1, mean-class, per-class
accuracy, read lazily batch by batch; see `unsupft.eval.classifier`) goes to `test.json` (with the
confusion matrix), to `_DONE.json` and as a last line of `metrics.jsonl`.
"""

from __future__ import annotations

import json
from typing import Any

import click
import numpy as np
import torch

from unsupft import checkpoint, options, stage, store
from unsupft.distributed import default_device
from unsupft.data.samples import Fitted, Samples, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval.classifier import labels_in_classes, score_classifier, summary_of
from unsupft.eval.fewshot import draw_shots, read_label_list
from unsupft.models import ARCHS, load_backbone, save_model
from unsupft.models.io import describe
from unsupft.train.transfer import METHODS, finetune


def select_training_set(
    data: Samples, shots: int | None, seed: int, labels_file: str | None
) -> tuple[np.ndarray, torch.Tensor]:
    """(indices, labels) of the samples to train on: K per class, a key list, or every labeled one.
    Chosen from the index's labels and keys: no image is decoded."""
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
    if shots is not None:
        indices = draw_shots(data.labels.numpy(), shots, seed, classes)
    else:
        indices = np.arange(len(data))
    return indices, data.labels[indices]


@click.command("transfer")
@click.option("--init", required=True, help="Stage output URI or checkpoint file (model.pt, moco.pt, torchvision state_dict).")
@click.option("--train", "train_uri", required=True, help="Labeled training data set URI.")
@click.option("--shots", type=options.count(1, 100_000), default=None, help="Draw exactly K labeled images per class.")
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the draw, init, order and augmentation.")
@click.option("--labels", "labels_file", default=None,
              help="CSV/text list of keys to train on (optional header key,label; labels override the shards').")
@click.option("--method", type=click.Choice(list(METHODS)), default="ce", show_default=True)
@click.option("--epochs", type=options.EPOCHS, default=100, show_default=True)
@click.option("--coin-alpha", type=options.number(0, 1), default=0.7, show_default=True,
              help="COIN: share of the epochs trained with SupCon alone.")
@click.option("--batch-size", type=options.BATCH, default=64, show_default=True)
@click.option("--lr-head", type=options.LEARNING_RATE, default=3.0, show_default=True, help="Learning rate of the new classifier.")
@click.option("--lr-backbone", type=options.LEARNING_RATE, default=1e-4, show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture of a plain torchvision --init.")
@click.option("--test", "test_uri", default=None,
              help="Labeled test set: the finetuned model's top-1, mean-class and per-class accuracy (test.json, _DONE.json).")
@click.option("--image-size", type=options.IMAGE_SIZE, default=None,
              help="Input side in pixels (short side resized, centre-cropped); default: the size --init records, else the data's.")
@click.option("--out", required=True, help="Output URI.")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def transfer_command(init: str, train_uri: str, shots: int | None, seed: int, labels_file: str | None, method: str,
                     epochs: int, coin_alpha: float, batch_size: int, lr_head: float, lr_backbone: float,
                     arch: str | None, test_uri: str | None, image_size: int | None, out: str) -> None:
    """Finetune --init on labeled --train images (all, --shots K per class, or --labels FILE); --test scores it."""
    if shots is not None and labels_file is not None:
        raise UserError("give either --shots or --labels, not both")
    run = stage.start("transfer", store.normalize(out), {
        "init": init, "train": train_uri, "shots": shots, "seed": seed, "labels": labels_file, "method": method,
        "epochs": epochs, "coin_alpha": coin_alpha, "batch_size": batch_size, "lr_head": lr_head,
        "lr_backbone": lr_backbone, "arch": arch,
        # only when given: outputs of runs without them keep their config hash
        **({"test": test_uri} if test_uri else {}), **({"image_size": image_size} if image_size else {})},
        inputs={"init": init, "train": train_uri, "labels": labels_file, "test": test_uri})
    if run is None:
        return
    data = open_samples(train_uri)
    test = open_samples(test_uri, data.channels) if test_uri else None
    test_labels = labels_in_classes(data.classes, test, f"the train set {train_uri}") if test else None
    backbone, meta = load_backbone(init, arch=arch, in_channels=data.channels)
    click.echo(f"init: {describe(meta)}", err=True)
    indices, labels = select_training_set(data, shots, seed, labels_file)
    meta["image_size"] = image_size_of(data, image_size or meta.get("image_size"), "--image-size")

    run.claim(image_size=meta["image_size"])
    model = finetune(backbone, meta, subset(data, meta["image_size"], indices), labels, len(data.classes), method=method,
                     epochs=epochs, seed=seed, out=run.out, batch_size=batch_size, coin_alpha=coin_alpha,
                     lr_head=lr_head, lr_backbone=lr_backbone)
    store.write_text(store.join(run.out, "train_keys.txt"), "".join(data.key(int(i)) + "\n" for i in indices))
    save_model(store.join(run.out, "model.pt"), model.backbone, meta["arch"], meta["in_channels"], meta["image_size"],
               classifier=model.fc, classes=list(data.classes))
    scored = {}
    if test is not None:
        score = score_classifier(model.to(default_device()), Fitted(test, meta["image_size"]), test_labels,
                                 data.classes, meta["image_size"], batch_size)
        store.write_json(store.join(run.out, TEST_SCORE), score)
        scored = {"test": summary_of(score)}
        append_test_line(run.out, scored["test"])
        click.echo(f"test: top-1 {score['top1']:.4f}, mean-class {score['mean_class']:.4f} "
                   f"on {score['test_samples']} images", err=True)
    run.finish(trained_on=int(len(indices)), **scored)
    click.echo(f"{run.out}: finetuned with {method} on {len(indices)} labeled images", err=True)


TEST_SCORE = "test.json"


def append_test_line(out: str, summary: dict[str, Any]) -> None:
    """The test score as the last line of metrics.jsonl (`test_top1`, `test_mean_class`), after the
    loop's epoch lines; a rerun that resumed a finished run replaces its earlier test line."""
    uri = store.join(out, stage.METRICS_FILE)
    lines = [ln for ln in store.read_text(uri).splitlines(keepends=True)
             if ln.strip() and "test_top1" not in json.loads(ln)]
    last_step = json.loads(lines[-1])["step"] if lines else 0
    record = {"step": last_step, "test_top1": summary["top1"], "test_mean_class": summary["mean_class"]}
    store.write_text(uri, "".join(lines) + json.dumps(record) + "\n")
