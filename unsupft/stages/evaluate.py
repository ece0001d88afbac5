"""`unsupft evaluate`: compare models on a labeled train/test pair and write a report.

For each `--model NAME=URI` (features always taken in eval mode, images fitted to `--image-size`,
default the size the model records):
- `classifier`: when the model carries its own classifier (a transfer or label output), its top-1,
  mean-class and per-class accuracy and confusion matrix on the test set (`unsupft.eval.classifier`);
- `fewshot`: for K in `--shots` and `--trials` seeded draws, finetune a copy of the backbone on K
  train images per class with `--method`, then top-1 and mean-class accuracy on the test set;
- `retrieval`: each test image queries the train set (cosine, top-5), share with its label;
- `clustering`: KMeans with C clusters on train features, BCubed precision, recall and F;
- `sdbw`: S_Dbw of the train features grouped by label; `linear`: linear probe top-1 on test;
- `map`: a 2-D map of the test features for the report's picture.
The report (`unsupft.eval.report`) adds a card per model (`unsupft.eval.cards`), differences against
`--baseline NAME` and the accuracy per round of each `--label NAME=URI` run.
Every input is checked before anything is computed or written: models exist and load, every test
class is a train class (and a class of each model's own classifier), K fits the smallest train class,
the baseline is a model, the label runs are label outputs with test accuracies.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import torch

from unsupft import options, stage, store
from unsupft.data.samples import Fitted, Samples, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval import metrics, report
from unsupft.eval.cards import label_rounds, model_card
from unsupft.eval.classifier import align_test_labels, labels_in_classes, score_classifier, with_classifier
from unsupft.models.features import extract_features
from unsupft.models import ARCHS, load_backbone
from unsupft.models.io import describe
from unsupft.eval.fewshot import draw_shots
from unsupft.train.transfer import METHODS, FinetuneConfig, check_batch, finetune, predict

METRIC_NAMES = ("classifier", "fewshot", "retrieval", "clustering", "sdbw", "linear", "map")


def parse_list(value: str, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        unknown = [v for v in items if v not in allowed]
        if unknown:
            raise UserError(f"{option}: unknown {unknown} (choose from {', '.join(allowed)})")
    return items


def evaluate_model(backbone: torch.nn.Module, meta: dict[str, Any], train: Samples, test: Samples,
                   test_labels: torch.Tensor, enabled: list[str], shots: list[int], config: EvaluateConfig,
                   own_labels: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics of one model, test feature 2-D map or None). Images are read batch by batch (only
    features stay in memory); each few-shot draw loads just its K x C training images.
    `own_labels`: the test labels as ids of the model's own classifier's classes, when it has one."""
    seed, batch_size, trials = config.seed, config.batch_size, config.trials
    result: dict[str, Any] = {}
    classes = train.classes
    train_y, test_y = train.labels.numpy(), test_labels.numpy()
    size = meta["image_size"]
    test_images = Fitted(test, size)
    if "classifier" in enabled and own_labels is not None:
        result["classifier"] = score_classifier(with_classifier(backbone, meta["classifier"]), test_images,
                                                own_labels, meta["classes"], size, batch_size)
    if any(m in enabled for m in ("retrieval", "clustering", "sdbw", "linear", "map")):
        f_train = extract_features(backbone, Fitted(train, size), batch_size, size).numpy()
        f_test = extract_features(backbone, test_images, batch_size, size).numpy()
    if "retrieval" in enabled:
        result["retrieval_top5"] = metrics.retrieval_accuracy(f_test, test_y, f_train, train_y, k=5)
    if "clustering" in enabled:
        result.update(metrics.clustering_bcubed(f_train, train_y, seed=seed))
    if "sdbw" in enabled:
        result["sdbw"] = metrics.s_dbw(f_train, train_y)
    if "linear" in enabled:
        result["linear_top1"] = metrics.linear_probe_accuracy(f_train, train_y, f_test, test_y)
    if "fewshot" in enabled:
        fewshot = {}
        for k in shots:
            top1, mean_class = [], []
            for trial in range(trials):
                trial_seed = seed * 1000 + trial
                idx = draw_shots(train_y, k, trial_seed, classes)
                recipe = FinetuneConfig(method=config.method, epochs=config.epochs, seed=trial_seed,
                                        batch_size=batch_size)
                model = finetune(copy.deepcopy(backbone), meta, subset(train, size, idx), train.labels[idx],
                                 len(classes), recipe)
                predictions = predict(model, test_images).numpy()
                top1.append(metrics.top1_accuracy(predictions, test_y))
                mean_class.append(metrics.mean_class_accuracy(predictions, test_y))
            fewshot[str(k)] = {"top1_mean": float(np.mean(top1)), "top1_std": float(np.std(top1)),
                               "mean_class_mean": float(np.mean(mean_class)),
                               "mean_class_std": float(np.std(mean_class)), "trials": trials}
        result["fewshot"] = fewshot
    coords = None
    if "map" in enabled:
        keep = report.subsample(len(f_test), seed)
        coords = (report.embed_2d(f_test[keep], seed), test_y[keep])
    return result, coords


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(stage.StageOptions):
    model: tuple[str, ...] = options.option(
        multiple=True, metavar="NAME=URI", hashed=False,
        help="A model to evaluate: stage output URI or checkpoint file (repeatable).")
    train: str = options.option(help="Labeled train data set (few-shot draws, retrieval database).")
    test: str = options.option(help="Labeled test data set.")
    shots: str = options.option("1,2,4,8", help="Comma list of K labeled images per class.")
    trials: int = options.option(3, type=options.count(1, 1000), help="Seeded draws per K.")
    method: str = options.option("ce", type=click.Choice(list(METHODS)), help="Few-shot finetuning method.")
    epochs: int = options.option(
        100, type=options.EPOCHS, help="Few-shot finetuning epochs (one step each at small K: few-shot runs need many).")
    metrics: str = options.option(",".join(METRIC_NAMES), help="Comma list of metrics to compute.")
    batch_size: int = options.option(64, type=options.BATCH)
    arch: str | None = options.option(None, type=click.Choice(ARCHS), help="Architecture of plain torchvision checkpoints.")
    # "given": reports of runs without --image-size, --baseline or --label keep their config hash
    image_size: int | None = options.option(
        None, type=options.IMAGE_SIZE, hashed="given",
        help="Input side in pixels (short side resized, centre-cropped); default: each model's recorded size, else the data's.")
    baseline: str | None = options.option(
        None, metavar="NAME", hashed="given", help="A --model name: the report adds each model's difference against it.")
    label: tuple[str, ...] = options.option(
        (), multiple=True, metavar="NAME=URI", hashed=False,
        help="A label stage output: the report plots its test accuracy per round (repeatable).")
    seed: int = options.option(0, type=options.SEED)
    out: str = options.option(help="Output URI for report.json, report.html and the pictures.", hashed=False)

    def identity(self) -> dict[str, Any]:
        """With the values parsed (`--shots 4,1` and `--shots 1,4` are one config); `label` only when given."""
        try:
            shots = sorted({int(s) for s in parse_list(self.shots, "--shots")})
        except ValueError:
            raise UserError(f"--shots '{self.shots}': expected a comma list of integers") from None
        label = options.parse_named(self.label, "--label")
        return {**super().identity(), "models": options.parse_named(self.model, "--model"), "shots": shots,
                "metrics": parse_list(self.metrics, "--metrics", METRIC_NAMES), **({"label": label} if label else {})}


@click.command("evaluate")
@options.options_from(EvaluateConfig)
@report_user_errors
def evaluate_command(config: EvaluateConfig) -> None:
    """Own classifier, few-shot transfer, retrieval, clustering, S_Dbw and linear probe of each --model; writes a report."""
    identity = config.identity()
    models, label_runs = identity["models"], identity.get("label", {})
    enabled, shot_list = identity["metrics"], identity["shots"]
    train_uri, test_uri, seed, baseline = config.train, config.test, config.seed, config.baseline
    if baseline is not None and baseline not in models:
        raise UserError(f"--baseline '{baseline}' names no --model (models: {', '.join(models)})")
    run = stage.start("evaluate", store.normalize(config.out), identity, inputs={
        "train": train_uri, "test": test_uri, **models, **{f"label_{n}": u for n, u in label_runs.items()}})
    if run is None:
        return
    train = open_samples(train_uri)
    test = open_samples(test_uri, train.channels)
    test_labels = align_test_labels(train, test)
    if "fewshot" in enabled and shot_list:
        draw_shots(train.labels.numpy(), max(shot_list), seed, train.classes)  # K fits every class?
        check_batch(FinetuneConfig(method=config.method, batch_size=config.batch_size))
    curves = {name: label_rounds(name, uri) for name, uri in label_runs.items()}
    loaded, cards = {}, {}
    for name, uri in models.items():
        backbone, meta = load_backbone(uri, arch=config.arch, in_channels=train.channels)
        meta["image_size"] = image_size_of(train, config.image_size or meta.get("image_size"), "--image-size")
        own = None
        if meta.get("classifier") is not None and "classifier" in enabled:
            own = labels_in_classes(meta.get("classes") or [], test, f"the classifier of --model {name}")
        loaded[name] = (backbone, meta, own)
        cards[name] = model_card(uri, meta)
    for name, (_, meta, _) in loaded.items():  # after every check: bad input stays one line
        click.echo(f"model {name}: {describe(meta)}", err=True)

    run.claim()
    results: dict[str, Any] = {}
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lines = []
    for name, (backbone, meta, own) in loaded.items():
        results[name], coords = evaluate_model(backbone, meta, train, test, test_labels, enabled, shot_list, config,
                                               own)
        if coords is not None:
            maps[name] = coords
        lines.append(json.dumps({"model": name, **results[name]}, sort_keys=True) + "\n")
        shown = {k: v for k, v in results[name].items() if k not in ("fewshot", "classifier")}
        if "classifier" in results[name]:
            shown.update(classifier_top1=results[name]["classifier"]["top1"],
                         classifier_mean_class=results[name]["classifier"]["mean_class"])
        click.echo(f"{name}: " + json.dumps(shown), err=True)
    store.write_text(store.join(run.out, stage.METRICS_FILE), "".join(lines))
    full = {"models": results, "cards": cards, "label_curves": curves, "baseline": baseline,
            "inputs": {"train": train_uri, "test": test_uri, **models, **{f"label {n}": u for n, u in label_runs.items()}},
            "config": run.config, "classes": list(train.classes), "versions": stage.versions()}
    written = report.write_report(run.out, full, maps, list(train.classes))
    run.finish()
    click.echo(f"{run.out}: report written ({', '.join(written)})", err=True)
