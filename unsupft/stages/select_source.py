"""`unsupft select-source`: which candidate source data set to pretrain on, chosen as HPT does.

HPT picks its source "using the top-linear-analysis": a short MoCo pretrain from the base model
on each candidate, the same budget for all, then a linear probe on the labeled target; the best
probe wins. Each candidate's run is an ordinary `unsupft pretrain` output inside this stage's
output (`<out>/candidates/<name>`, the command itself run in-process), so a killed selection
skips the candidates that finished and resumes the one that was running from its checkpoint.
With `--target`, every candidate run is TUP-style (`pretrain --target`: the candidate with the
unlabeled target re-balanced into it), as the source would later be used. The runs take pretrain's
recipe options (`MoCoRecipe`: augmentations, crop scale, key momentum, temperature): a short run
ranks candidates by what it learned only where the recipe lets it learn (docs/semi.md).

The probe: logistic regression on frozen features (`unsupft.eval.metrics.linear_probe_accuracy`)
fit on `--probe-train` (all of it, or `--shots` K per class) and scored on `--probe-test` (or, with
`--shots` and no `--probe-test`, on the rest of `--probe-train`). The base model is probed too, as
the row every candidate should beat. Outputs: `config.json`, `candidates/<name>/...`,
`ranking.json`, `ranking.md` (the table), `_DONE.json` last with `chosen: {name, uri}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

import click
import numpy as np

from unsupft import options, stage, store
from unsupft.distributed import default_device, env_dist
from unsupft.data.samples import Fitted, Samples, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.models.features import extract_features
from unsupft.eval.classifier import align_test_labels
from unsupft.eval.metrics import linear_probe_accuracy
from unsupft.models import load_backbone
from unsupft.eval.fewshot import draw_shots
from unsupft.stages.moco_common import MoCoRecipe
from unsupft.stages.pretrain import PretrainConfig, pretrain
from unsupft.train.batches import require_bn_batch

CANDIDATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a folder name on every store


def probe_sets(train: Samples, test: Samples | None, shots: int | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray, Samples, np.ndarray, np.ndarray]:
    """(train indices, their labels, the test set, test indices, their labels in train's class ids)."""
    if train.labels is None:
        raise UserError(f"{train.uri}: the probe needs a labeled data set")
    labels = train.labels.numpy()
    chosen = draw_shots(labels, shots, seed, train.classes) if shots is not None else np.arange(len(train))
    if test is None:
        if shots is None:
            raise UserError("give --probe-test, or --shots K to probe on K per class of --probe-train and test on the rest")
        rest = np.setdiff1d(np.arange(len(train)), chosen)
        if len(rest) == 0:
            raise UserError(f"--shots {shots} leaves no image of {train.uri} to test the probe on")
        return chosen, labels[chosen], train, rest, labels[rest]
    test_labels = align_test_labels(train, test).numpy()
    return chosen, labels[chosen], test, np.arange(len(test)), test_labels


def probe(model_uri: str, train: Samples, train_idx: np.ndarray, train_y: np.ndarray, test: Samples,
          test_idx: np.ndarray, test_y: np.ndarray) -> float:
    """Linear-probe top-1 of `model_uri`'s frozen features (read batch by batch: only features stay)."""
    backbone, meta = load_backbone(model_uri, in_channels=train.channels)
    size = image_size_of(train, meta.get("image_size"), "a model with a recorded image size")
    backbone.to(default_device())
    f_train = extract_features(backbone, Fitted(train, size, train_idx), image_size=size).numpy()
    f_test = extract_features(backbone, Fitted(test, size, test_idx), image_size=size).numpy()
    return linear_probe_accuracy(f_train, train_y, f_test, test_y)


def ranking_table(rows: list[dict[str, Any]], base: float) -> str:
    lines = ["| rank | candidate | linear probe top-1 | URI |", "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {r['name']} | {r['linear_top1']:.4f} | {r['uri']} |" for r in rows]
    lines.append(f"| - | (base, no source pretraining) | {base:.4f} | |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class SelectSourceConfig(MoCoRecipe, stage.StageOptions):
    init: str = options.option(help="The base model every candidate's short pretrain starts from.")
    candidate: tuple[str, ...] = options.option(
        multiple=True, metavar="NAME=URI", hashed=False, help="A candidate source data set (repeatable, at least 2).")
    target: str | None = options.option(None, help="Unlabeled target, re-balanced into each candidate's pretrain (TUP).")
    probe_train: str = options.option(help="Labeled target images the linear probe fits on.")
    probe_test: str | None = options.option(None, help="Labeled target images the probe is scored on.")
    shots: int | None = options.option(
        None, type=options.count(1, 100_000),
        help="Fit the probe on K per class of --probe-train (without --probe-test: score it on the rest).")
    steps: int = options.option(200, type=options.STEPS, help="Pretraining steps per candidate (the same for all).")
    batch_size: int = options.option(128, type=options.BATCH)
    lr: float | None = options.option(
        None, type=options.LEARNING_RATE, help="Pretraining peak learning rate (default: pretrain's, 0.03 * batch / 256).")
    queue_size: int | str = options.option(
        "auto", type=options.CountOrAuto(1, 1 << 20),
        help="Each candidate's MoCo queue (auto: pretrain's, within an epoch of the candidate).")
    seed: int = options.option(0, type=options.SEED)
    checkpoint_every: int = options.option(100, type=options.count(0, 100_000_000), hashed=False)
    workers: int | None = options.option(None, type=options.count(0, 64), hashed=False,
                                         help="DataLoader workers (default: half the cores).")
    out: str = options.option(help="Output URI.", hashed=False)

    def candidates(self) -> dict[str, str]:
        """The --candidate data sets by name (checked: at least two, names that are folder names)."""
        candidates = options.parse_named(self.candidate, "--candidate")
        if len(candidates) < 2:
            raise UserError(f"give at least 2 --candidate NAME=URI to choose from (got {len(candidates)})")
        for name in candidates:
            if not CANDIDATE_NAME.match(name):
                raise UserError(f"--candidate '{name}': names are lower-case letters, digits, '-' and '_' (a folder name)")
        return candidates

    def identity(self) -> dict[str, Any]:
        """The recipe options count only where they differ from pretrain's defaults: selections
        finished before select-source took them keep their config hash."""
        defaults = MoCoRecipe().identity()
        return {**{k: v for k, v in super().identity().items() if k not in defaults or v != defaults[k]},
                "candidates": self.candidates()}


@click.command("select-source")
@options.options_from(SelectSourceConfig)
@report_user_errors
def select_source_command(config: SelectSourceConfig) -> None:
    """Rank --candidate source data sets by a short pretrain from --init and a linear probe on the target."""
    candidates = config.candidates()
    target = [config.target] if config.target else []
    run = stage.start("select-source", store.normalize(config.out), config.identity(), inputs={
        "init": config.init, "candidate": list(candidates.values()), "target": config.target,
        "probe_train": config.probe_train, "probe_test": config.probe_test})
    if run is None:
        return
    # before the claim: each candidate's pretrain would refuse it only after select-source had written
    require_bn_batch(config.batch_size, env_dist().world_size)
    probe_train = open_samples(config.probe_train)
    for uri in [*candidates.values(), *target]:
        if len(open_samples(uri, probe_train.channels)) == 0:
            raise UserError(f"{uri}: no images")
    probe_test = open_samples(config.probe_test, probe_train.channels) if config.probe_test else None
    sets = probe_sets(probe_train, probe_test, config.shots, config.seed)
    load_backbone(config.init, in_channels=probe_train.channels)  # a missing or foreign --init: before any write

    run.claim()
    base = probe(config.init, probe_train, *sets)
    rows = []
    for name, uri in candidates.items():
        candidate_out = store.join(run.out, "candidates", name)
        click.echo(f"candidate {name}: pretraining {config.steps} steps on {uri}", err=True)
        # an ordinary pretrain output: it skips when done and resumes from its checkpoint
        pretrain(PretrainConfig(
            data=(uri,), target=config.target, init=config.init, steps=config.steps, batch_size=config.batch_size,
            lr=config.lr, queue_size=config.queue_size, seed=config.seed, checkpoint_every=config.checkpoint_every,
            workers=config.workers, out=candidate_out, trust_checkpoint=config.trust_checkpoint,
            overwrite=config.overwrite, **{f.name: getattr(config, f.name) for f in fields(MoCoRecipe)}))
        rows.append({"name": name, "uri": uri, "run": candidate_out,
                     "linear_top1": probe(candidate_out, probe_train, *sets)})
    rows.sort(key=lambda r: -r["linear_top1"])  # stable: ties keep the order given
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    chosen = {"name": rows[0]["name"], "uri": rows[0]["uri"]}
    store.write_text(store.join(run.out, "ranking.json"), json.dumps(
        {"ranking": rows, "base_linear_top1": base, "chosen": chosen, "steps": config.steps}, indent=1) + "\n")
    table = ranking_table(rows, base)
    store.write_text(store.join(run.out, "ranking.md"), table)
    click.echo(table, err=True)
    run.finish(chosen=chosen)
    click.echo(f"{run.out}: chose '{chosen['name']}' ({chosen['uri']})", err=True)
