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
from typing import Any

import click
import numpy as np
import torch

from unsupft import checkpoint, options, stage, store
from unsupft.data.samples import Fitted, Samples, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval import metrics, report
from unsupft.eval.cards import label_rounds, model_card
from unsupft.eval.classifier import labels_in_classes, score_classifier, with_classifier
from unsupft.models.features import extract_features
from unsupft.models import ARCHS, load_backbone
from unsupft.models.io import describe
from unsupft.eval.fewshot import draw_shots
from unsupft.train.transfer import METHODS, finetune, predict

METRIC_NAMES = ("classifier", "fewshot", "retrieval", "clustering", "sdbw", "linear", "map")


def parse_named(specs: tuple[str, ...], option: str = "--model") -> dict[str, str]:
    """`NAME=URI` values of a repeatable option, by name."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"{option} '{spec}': expected NAME=URI")
        if name in named:
            raise UserError(f"{option}: the name '{name}' is given twice")
        named[name] = uri
    return named


def parse_list(value: str, option: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        unknown = [v for v in items if v not in allowed]
        if unknown:
            raise UserError(f"{option}: unknown {unknown} (choose from {', '.join(allowed)})")
    return items


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


def summary(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def evaluate_model(backbone: torch.nn.Module, meta: dict[str, Any], train: Samples, test: Samples,
                   test_labels: torch.Tensor, enabled: list[str], shots: list[int], trials: int, method: str,
                   epochs: int, seed: int, batch_size: int,
                   own_labels: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics of one model, test feature 2-D map or None). Images are read batch by batch (only
    features stay in memory); each few-shot draw loads just its K x C training images.
    `own_labels`: the test labels as ids of the model's own classifier's classes, when it has one."""
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
                model = finetune(copy.deepcopy(backbone), meta, subset(train, size, idx), train.labels[idx],
                                 len(classes), method=method, epochs=epochs, seed=trial_seed, batch_size=batch_size)
                predictions = predict(model, test_images).numpy()
                top1.append(metrics.top1_accuracy(predictions, test_y))
                mean_class.append(metrics.mean_class_accuracy(predictions, test_y))
            (t_mean, t_std), (m_mean, m_std) = summary(top1), summary(mean_class)
            fewshot[str(k)] = {"top1_mean": t_mean, "top1_std": t_std, "mean_class_mean": m_mean,
                               "mean_class_std": m_std, "trials": trials}
        result["fewshot"] = fewshot
    coords = None
    if "map" in enabled:
        keep = report.subsample(len(f_test), seed)
        coords = (report.embed_2d(f_test[keep], seed), test_y[keep])
    return result, coords


@click.command("evaluate")
@click.option("--model", "model_specs", multiple=True, required=True, metavar="NAME=URI",
              help="A model to evaluate: stage output URI or checkpoint file (repeatable).")
@click.option("--train", "train_uri", required=True, help="Labeled train data set (few-shot draws, retrieval database).")
@click.option("--test", "test_uri", required=True, help="Labeled test data set.")
@click.option("--shots", default="1,2,4,8", show_default=True, help="Comma list of K labeled images per class.")
@click.option("--trials", type=options.count(1, 1000), default=3, show_default=True, help="Seeded draws per K.")
@click.option("--method", type=click.Choice(list(METHODS)), default="ce", show_default=True, help="Few-shot finetuning method.")
@click.option("--epochs", type=options.EPOCHS, default=100, show_default=True,
              help="Few-shot finetuning epochs (one step each at small K: few-shot runs need many).")
@click.option("--metrics", "metrics_list", default=",".join(METRIC_NAMES), show_default=True,
              help="Comma list of metrics to compute.")
@click.option("--batch-size", type=options.BATCH, default=64, show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture of plain torchvision checkpoints.")
@click.option("--image-size", type=options.IMAGE_SIZE, default=None,
              help="Input side in pixels (short side resized, centre-cropped); default: each model's recorded size, else the data's.")
@click.option("--baseline", default=None, metavar="NAME", help="A --model name: the report adds each model's difference against it.")
@click.option("--label", "label_specs", multiple=True, metavar="NAME=URI",
              help="A label stage output: the report plots its test accuracy per round (repeatable).")
@click.option("--seed", type=options.SEED, default=0, show_default=True)
@click.option("--out", required=True, help="Output URI for report.json, report.html and the pictures.")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def evaluate_command(model_specs: tuple[str, ...], train_uri: str, test_uri: str, shots: str, trials: int,
                     method: str, epochs: int, metrics_list: str, batch_size: int, arch: str | None,
                     image_size: int | None, baseline: str | None, label_specs: tuple[str, ...], seed: int,
                     out: str) -> None:
    """Own classifier, few-shot transfer, retrieval, clustering, S_Dbw and linear probe of each --model; writes a report."""
    models = parse_named(model_specs, "--model")
    label_runs = parse_named(label_specs, "--label")
    if baseline is not None and baseline not in models:
        raise UserError(f"--baseline '{baseline}' names no --model (models: {', '.join(models)})")
    enabled = parse_list(metrics_list, "--metrics", METRIC_NAMES)
    try:
        shot_list = sorted({int(s) for s in parse_list(shots, "--shots")})
    except ValueError:
        raise UserError(f"--shots '{shots}': expected a comma list of integers") from None
    run = stage.start("evaluate", store.normalize(out), {
        "models": models, "train": train_uri, "test": test_uri, "shots": shot_list, "trials": trials, "method": method,
        "epochs": epochs, "metrics": enabled, "batch_size": batch_size, "arch": arch, "seed": seed,
        # only when given: reports of runs without them keep their config hash
        **({"image_size": image_size} if image_size else {}),
        **({"baseline": baseline} if baseline else {}), **({"label": label_runs} if label_runs else {})},
        inputs={"train": train_uri, "test": test_uri, **models, **{f"label_{n}": u for n, u in label_runs.items()}})
    if run is None:
        return
    train = open_samples(train_uri)
    test = open_samples(test_uri, train.channels)
    test_labels = align_test_labels(train, test)
    if "fewshot" in enabled and shot_list:
        draw_shots(train.labels.numpy(), max(shot_list), seed, train.classes)  # K fits every class?
    curves = {name: label_rounds(name, uri) for name, uri in label_runs.items()}
    loaded, cards = {}, {}
    for name, uri in models.items():
        backbone, meta = load_backbone(uri, arch=arch, in_channels=train.channels)
        meta["image_size"] = image_size_of(train, image_size or meta.get("image_size"), "--image-size")
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
        results[name], coords = evaluate_model(backbone, meta, train, test, test_labels, enabled, shot_list, trials,
                                               method, epochs, seed, batch_size, own)
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
