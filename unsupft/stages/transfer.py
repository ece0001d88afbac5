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
from dataclasses import dataclass
from typing import Any

import click

from unsupft import options, stage, store
from unsupft.distributed import default_device
from unsupft.data.samples import Fitted, image_size_of, open_samples, subset
from unsupft.errors import report_user_errors
from unsupft.eval.classifier import labels_in_classes, score_classifier, summary_of
from unsupft.eval.fewshot import select_training_set
from unsupft.models import ARCHS, load_backbone
from unsupft.models.io import describe
from unsupft.train.transfer import METHODS, FinetuneConfig, check_batch, finetune, save_finetuned


@dataclass(frozen=True, kw_only=True)
class TransferConfig(stage.StageOptions):
    init: str = options.option(help="Stage output URI or checkpoint file (model.pt, moco.pt, torchvision state_dict).")
    train: str = options.option(help="Labeled training data set URI.")
    shots: int | None = options.option(None, type=options.count(1, 100_000), help="Draw exactly K labeled images per class.")
    seed: int = options.option(FinetuneConfig.seed, type=options.SEED, help="Seed of the draw, init, order and augmentation.")
    labels: str | None = options.option(
        None, help="CSV/text list of keys to train on (optional header key,label; labels override the shards').")
    method: str = options.option(FinetuneConfig.method, type=click.Choice(list(METHODS)))
    epochs: int = options.option(FinetuneConfig.epochs, type=options.EPOCHS)
    coin_alpha: float = options.option(FinetuneConfig.coin_alpha, type=options.number(0, 1),
                                       help="COIN: share of the epochs trained with SupCon alone.")
    batch_size: int = options.option(FinetuneConfig.batch_size, type=options.BATCH)
    lr_head: float = options.option(FinetuneConfig.lr_head, type=options.LEARNING_RATE,
                                    help="Learning rate of the new classifier.")
    lr_backbone: float = options.option(FinetuneConfig.lr_backbone, type=options.LEARNING_RATE)
    arch: str | None = options.option(None, type=click.Choice(ARCHS), help="Architecture of a plain torchvision --init.")
    # "given": outputs of runs without --test or --image-size keep their config hash
    test: str | None = options.option(
        None, hashed="given",
        help="Labeled test set: the finetuned model's top-1, mean-class and per-class accuracy (test.json, _DONE.json).")
    image_size: int | None = options.option(
        None, type=options.IMAGE_SIZE, hashed="given",
        help="Input side in pixels (short side resized, centre-cropped); default: the size --init records, else the data's.")
    out: str = options.option(help="Output URI.", hashed=False)

    def finetuning(self) -> FinetuneConfig:
        """What `finetune` takes of these options (the method's other settings keep their defaults)."""
        return FinetuneConfig(method=self.method, epochs=self.epochs, seed=self.seed, batch_size=self.batch_size,
                              coin_alpha=self.coin_alpha, lr_head=self.lr_head, lr_backbone=self.lr_backbone)


@click.command("transfer")
@options.options_from(TransferConfig)
@report_user_errors
def transfer_command(config: TransferConfig) -> None:
    """Finetune --init on labeled --train images (all, --shots K per class, or --labels FILE); --test scores it."""
    run = stage.start("transfer", store.normalize(config.out), config.identity(), inputs={
        "init": config.init, "train": config.train, "labels": config.labels, "test": config.test})
    if run is None:
        return
    data = open_samples(config.train)
    test = open_samples(config.test, data.channels) if config.test else None
    test_labels = labels_in_classes(data.classes, test, f"the train set {config.train}") if test else None
    backbone, meta = load_backbone(config.init, arch=config.arch, in_channels=data.channels)
    click.echo(f"init: {describe(meta)}", err=True)
    indices, labels = select_training_set(data, config.shots, config.seed, config.labels)
    meta["image_size"] = image_size_of(data, config.image_size or meta.get("image_size"), "--image-size")
    check_batch(config.finetuning())

    run.claim(image_size=meta["image_size"])
    model = finetune(backbone, meta, subset(data, meta["image_size"], indices), labels, len(data.classes),
                     config.finetuning(), out=run.out)
    save_finetuned(run.out, model, meta, data, indices)
    scored = {}
    if test is not None:
        score = score_classifier(model.to(default_device()), Fitted(test, meta["image_size"]), test_labels,
                                 data.classes, meta["image_size"], config.batch_size)
        store.write_json(store.join(run.out, TEST_SCORE), score)
        scored = {"test": summary_of(score)}
        append_test_line(run.out, scored["test"])
        click.echo(f"test: top-1 {score['top1']:.4f}, mean-class {score['mean_class']:.4f} "
                   f"on {score['test_samples']} images", err=True)
    run.finish(trained_on=int(len(indices)), **scored)
    click.echo(f"{run.out}: finetuned with {config.method} on {len(indices)} labeled images", err=True)


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
