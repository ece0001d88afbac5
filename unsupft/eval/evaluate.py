"""`unsupft evaluate`: compare models on a labeled train/test pair and write a report.

For each `--model NAME=URI` (features always taken in eval mode):
- `fewshot`: for K in `--shots` and `--trials` seeded draws, finetune a copy of the backbone on K
  train images per class with `--method`, then top-1 and mean-class accuracy on the test set;
- `retrieval`: each test image queries the train set (cosine, top-5), share with its label;
- `clustering`: KMeans with C clusters on train features, BCubed precision;
- `sdbw`: S_Dbw of the train features grouped by label; `linear`: linear probe top-1 on test;
- `map`: a 2-D map of the test features for the report's picture.
Every input is checked before anything is computed or written: models exist and load, every test
class is a train class, K fits the smallest train class.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import click
import numpy as np
import torch

from unsupft import checkpoint, options, stage, store
from unsupft.data.samples import Fitted, Samples, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval import metrics, report
from unsupft.eval.features import extract_features
from unsupft.models import ARCHS, load_backbone
from unsupft.models.io import describe
from unsupft.train.fewshot import draw_shots
from unsupft.train.transfer import METHODS, finetune, predict

METRICS = ("fewshot", "retrieval", "clustering", "sdbw", "linear", "map")


def parse_models(specs: tuple[str, ...], option: str = "--model") -> dict[str, str]:
    """NAME=URI specs of a repeatable `option` -> {name: uri}, names unique."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"{option} '{spec}': expected NAME=URI")
        if name in models:
            raise UserError(f"{option}: the name '{name}' is given twice")
        models[name] = uri
    return models


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
                   epochs: int, seed: int, batch_size: int) -> tuple[dict[str, Any], np.ndarray | None]:
    """(metrics of one model, test feature 2-D map or None). Images are read batch by batch (only
    features stay in memory); each few-shot draw loads just its K x C training images."""
    result: dict[str, Any] = {}
    classes = train.classes
    train_y, test_y = train.labels.numpy(), test_labels.numpy()
    size = meta["image_size"]
    test_images = Fitted(test, size)
    if any(m in enabled for m in ("retrieval", "clustering", "sdbw", "linear", "map")):
        f_train = extract_features(backbone, Fitted(train, size), batch_size, size).numpy()
        f_test = extract_features(backbone, test_images, batch_size, size).numpy()
    if "retrieval" in enabled:
        result["retrieval_top5"] = metrics.retrieval_accuracy(f_test, test_y, f_train, train_y, k=5)
    if "clustering" in enabled:
        result["cluster_bcubed_precision"] = metrics.clustering_bcubed_precision(f_train, train_y, seed=seed)
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
@click.option("--method", type=click.Choice(METHODS), default="ce", show_default=True, help="Few-shot finetuning method.")
@click.option("--epochs", type=options.EPOCHS, default=100, show_default=True,
              help="Few-shot finetuning epochs (one step each at small K: few-shot runs need many).")
@click.option("--metrics", "metrics_list", default=",".join(METRICS), show_default=True,
              help="Comma list of metrics to compute.")
@click.option("--batch-size", type=options.BATCH, default=64, show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture of plain torchvision checkpoints.")
@click.option("--seed", type=options.SEED, default=0, show_default=True)
@click.option("--out", required=True, help="Output URI for report.json, report.html and the pictures.")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def evaluate_command(model_specs: tuple[str, ...], train_uri: str, test_uri: str, shots: str, trials: int,
                     method: str, epochs: int, metrics_list: str, batch_size: int, arch: str | None, seed: int,
                     out: str) -> None:
    """Few-shot transfer, retrieval, clustering, S_Dbw and linear probe of each --model; writes a report."""
    started = time.time()
    out = store.normalize(out)
    models = parse_models(model_specs)
    enabled = parse_list(metrics_list, "--metrics", METRICS)
    try:
        shot_list = sorted({int(s) for s in parse_list(shots, "--shots")})
    except ValueError:
        raise UserError(f"--shots '{shots}': expected a comma list of integers") from None
    config: dict[str, Any] = {"stage": "evaluate", "models": models, "train": train_uri, "test": test_uri,
                              "shots": shot_list, "trials": trials, "method": method, "epochs": epochs,
                              "metrics": enabled, "batch_size": batch_size, "arch": arch, "seed": seed}
    if stage.is_done(out, config):
        click.echo(f"{out}: already done (same config); nothing to do", err=True)
        return
    train = open_samples(train_uri)
    test = open_samples(test_uri, train.channels)
    test_labels = align_test_labels(train, test)
    if "fewshot" in enabled and shot_list:
        draw_shots(train.labels.numpy(), max(shot_list), seed, train.classes)  # K fits every class?
    loaded = {}
    for name, uri in models.items():
        backbone, meta = load_backbone(uri, arch=arch, in_channels=train.channels)
        click.echo(f"model {name}: {describe(meta)}", err=True)
        meta["image_size"] = image_size_of(train, meta.get("image_size"), f"a model with a recorded image size ({name})")
        loaded[name] = (backbone, meta)

    stage.write_config(out, config)
    results: dict[str, Any] = {}
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lines = []
    for name, (backbone, meta) in loaded.items():
        results[name], coords = evaluate_model(backbone, meta, train, test, test_labels, enabled, shot_list, trials,
                                               method, epochs, seed, batch_size)
        if coords is not None:
            maps[name] = coords
        lines.append(json.dumps({"model": name, **results[name]}, sort_keys=True) + "\n")
        click.echo(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "fewshot"}), err=True)
    store.write_text(store.join(out, stage.METRICS), "".join(lines))
    full = {"models": results, "inputs": {"train": train_uri, "test": test_uri, **models}, "config": config,
            "classes": list(train.classes), "versions": stage.versions()}
    written = report.write_report(out, full, maps, list(train.classes))
    stage.write_done(out, "evaluate", config, {"train": train_uri, "test": test_uri, **models},
                     ["config.json", stage.METRICS, *written], started)
    click.echo(f"{out}: report written ({', '.join(written)})", err=True)
