"""`unsupft label`: progressive few-label transfer ("1 + epsilon") with a person or an oracle in the loop.

Round 0 labels the initial set: one sample per class chosen by the seed (oracle), a key file
(`--initial FILE`, column `key`, optional `label`), or, for a person who has no labels yet, the C
eigen-samples of ACKMeans without anchors. Every later round
  1. extracts features of the whole target set with the previous round's model,
  2. runs ACKMeans with the labeled samples as fixed anchors and K = b*C new centers (the last round
     takes what is left of the budget epsilon*C), or draws K unlabeled samples (`--selector random`),
  3. asks the annotator for the labels of the selected (eigen-)samples,
  4. finetunes on all labels so far.
Finetuning always starts from `--init`, not from the previous round's model: every round's model is
then a function of its label set alone (reproducible, comparable across rounds and selectors, the
same as one transfer run with those labels), and no drift or over-fitting to the early labels
accumulates over rounds; a round costs one short finetuning either way. The previous round's model
is used only to see the data (features for selection), which is where co-evolution pays off.

Checkpointing: `state.json` in `--out` records the round, its phase (select, annotate, finetune) and
the keys requested, and is rewritten (atomically) at each phase change. Selected keys are recorded
*before* they are sent to the annotator, so a run killed anywhere resumes in the round and phase it
was in and never asks for a key twice. Outputs: `labels.csv` (key,label,round), `rounds.jsonl`,
`rounds/round-N/model.pt`, the final `model.pt` and `_DONE.json` (written last).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import click
import torch

from unsupft import store
from unsupft.data.samples import Fitted, image_size_of, open_samples
from unsupft.errors import UserError
from unsupft.models import load, load_backbone, save_model
from unsupft.models.features import extract_features
from unsupft.models.io import describe
from unsupft.select.ackmeans import ackmeans
from unsupft.select.annotators import Annotator, ManualAnnotator, OracleAnnotator, csv_text
from unsupft.train.transfer import FinetuneConfig, finetune, predict

STATE = "state.json"


class Engine(Protocol):
    """Features and finetuning, by model URI (the real one wraps unsupft.train.transfer)."""

    def features(self, model_uri: str, images: Any) -> torch.Tensor:
        """Float features [N, d] of uint8 images [N, C, H, W] (a tensor or a lazy view)."""

    def finetune(self, init: str, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], out: str, *,
                 method: str, epochs: int, seed: int, test: tuple[Any, torch.Tensor] | None) -> float | None:
        """Finetune `init` on the labeled images, write `<out>/model.pt`; test accuracy or None."""


@dataclass
class Target:
    keys: list[str]
    images: Any  # uint8 [N, C, H, W]: a tensor, or the lazy `unsupft.data.samples.Fitted` view
    labels: torch.Tensor | None  # shard labels (only the oracle may look at them)
    classes: list[str]


@dataclass
class LabelConfig:
    init: str
    data: str
    out: str
    test: str | None = None
    budget: float = 1.0
    per_round: int = 1
    initial: str = "seeded"
    annotator: str = "oracle"
    selector: str = "ackmeans"
    method: str = "ce"
    epochs: int = 30
    seed: int = 0
    metric: str = "cosine"

    @classmethod
    def from_config(cls, config: dict[str, Any], out: str) -> "LabelConfig":
        """The run a stored config.json describes, in `out` (its other keys are the contract's)."""
        return cls(**{k: v for k, v in config.items() if k in cls.__dataclass_fields__ and k != "out"}, out=out)

    def as_dict(self) -> dict[str, Any]:
        """The stage config (config.json, its hash): where the run lives is not part of it, so a
        copied output resumes in its new place (`--resume --out COPY` reads and writes COPY)."""
        return {k: v for k, v in self.__dict__.items() if k != "out"}


@dataclass
class State:
    round: int = 0
    phase: str = "select"  # select -> annotate -> finetune -> (next round) select ... -> done
    pending: list[str] = field(default_factory=list)
    labeled: list[list[Any]] = field(default_factory=list)  # [key, label id, round]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, out: str) -> "State | None":
        uri = store.join(out, STATE)
        return cls(**store.read_json(uri)) if store.exists(uri) else None

    def save(self, out: str, classes: Sequence[str]) -> None:
        """labels.csv first, state last: the state never claims labels that are not written."""
        labels = csv_text(["key", "label", "round"], ([k, classes[y], r] for k, y, r in self.labeled))
        store.write_text(store.join(out, "labels.csv"), labels)
        store.write_text(store.join(out, "rounds.jsonl"), "".join(json.dumps(r) + "\n" for r in self.rounds))
        store.write_json(store.join(out, STATE), self.__dict__)


def remaining(cfg: LabelConfig, state: State, target: Target) -> int:
    """Labels still to request after the rounds recorded so far (0: the run is complete)."""
    spent = len(state.labeled) - state.rounds[0]["labels"]
    left = round(cfg.budget * len(target.classes)) - spent  # epsilon * C extra labels beyond the initial set
    return max(0, min(left, len(target.keys) - len(state.labeled)))


def model_uri(out: str, round_index: int) -> str:
    return store.join(out, "rounds", f"round-{round_index}", "model.pt")


def initial_keys(cfg: LabelConfig, target: Target, engine: Engine) -> tuple[list[str], dict[str, int]]:
    """Round 0's keys, and any labels that came with them (a key,label file)."""
    if cfg.initial != "seeded":
        rows = list(csv.DictReader(io.StringIO(store.read_text(cfg.initial))))
        if not rows or "key" not in rows[0]:
            raise UserError(f"{cfg.initial}: expected a CSV with a 'key' column (and optionally 'label')")
        known = set(target.keys)
        class_id = {name: i for i, name in enumerate(target.classes)}
        keys, given = [], {}
        for line, row in enumerate(rows, start=2):
            key = row["key"].strip()
            if key not in known or key in keys:
                raise UserError(f"{cfg.initial}: line {line}: {'duplicate' if key in keys else 'unknown'} key {key!r}")
            keys.append(key)
            if row.get("label"):
                if row["label"].strip() not in class_id:
                    raise UserError(f"{cfg.initial}: line {line}: unknown class {row['label'].strip()!r}")
                given[key] = class_id[row["label"].strip()]
        return keys, given
    if cfg.annotator == "oracle":  # one per class, chosen by the seed among that class's samples
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(target.keys), generator=g)
        first: dict[int, str] = {}
        for i in order.tolist():
            first.setdefault(int(target.labels[i]), target.keys[i])
        return [first[c] for c in sorted(first)], {}
    # a person without labels: the C most representative samples (ACKMeans without anchors)
    feats = engine.features(cfg.init, target.images)
    picked = ackmeans(feats, [], len(target.classes), metric=cfg.metric, seed=cfg.seed).eigen
    return [target.keys[i] for i in picked.tolist()], {}


def select(cfg: LabelConfig, state: State, target: Target, engine: Engine, k: int) -> list[str]:
    """The round's new keys: ACKMeans eigen-samples around the labeled anchors, or a random draw."""
    index = {key: i for i, key in enumerate(target.keys)}
    labeled = [index[key] for key, _, _ in state.labeled]
    seed = cfg.seed * 1000 + state.round
    if cfg.selector == "random":
        free = torch.ones(len(target.keys), dtype=torch.bool)
        free[labeled] = False
        pool = torch.nonzero(free).flatten()
        picked = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]]
    else:
        feats = engine.features(model_uri(cfg.out, state.round - 1), target.images)
        picked = ackmeans(feats, labeled, k, metric=cfg.metric, seed=seed).eigen
    return [target.keys[i] for i in picked.tolist()]


def run_label(cfg: LabelConfig, target: Target, annotator: Annotator, engine: Engine,
              test: tuple[Any, torch.Tensor] | None = None, log=print) -> State:
    """Run (or resume) the rounds until the budget is spent; raises WaitingForLabels for a person."""
    C = len(target.classes)
    state = State.load(cfg.out) or State()
    index = {key: i for i, key in enumerate(target.keys)}
    while state.phase != "done":
        if state.phase == "select":
            if state.round == 0:
                keys, given = initial_keys(cfg, target, engine)
                state.labeled = [[k, y, 0] for k, y in given.items()]
                keys = [k for k in keys if k not in given]
            else:
                k = min(cfg.per_round * C, remaining(cfg, state, target))
                keys = select(cfg, state, target, engine, k)
            state.pending, state.phase = keys, "annotate"
            state.save(cfg.out, target.classes)
            log(f"round {state.round}: requesting {len(keys)} labels")
        if state.phase == "annotate":
            if state.pending:
                # keys answered "not sure" are missing from answers: back to the pool, no budget spent
                answers = annotator.annotate(state.round, state.pending)
                state.labeled += [[k, int(answers[k]), state.round] for k in state.pending if k in answers]
            state.pending, state.phase = [], "finetune"
            state.save(cfg.out, target.classes)
        if state.phase == "finetune":
            idx = torch.tensor([index[k] for k, _, _ in state.labeled])
            y = torch.tensor([lab for _, lab, _ in state.labeled])
            acc = engine.finetune(
                cfg.init, target.images[idx], y, target.classes, store.join(cfg.out, "rounds", f"round-{state.round}"),
                method=cfg.method, epochs=cfg.epochs, seed=cfg.seed, test=test,
            )
            counts = torch.bincount(y, minlength=C).tolist()
            record = {"round": state.round, "labels": len(state.labeled),
                      "per_class": dict(zip(target.classes, counts)), "test_top1": acc}
            state.rounds = [r for r in state.rounds if r["round"] != state.round] + [record]
            log(json.dumps(record))
            if remaining(cfg, state, target) == 0:
                state.phase = "done"
            else:
                state.round, state.phase = state.round + 1, "select"
            state.save(cfg.out, target.classes)
    return state


class TransferEngine:
    """The real engine: `unsupft.models` backbones, `unsupft.train.transfer.finetune`, and
    `unsupft.models.features.extract_features`."""

    def __init__(self) -> None:
        self._described: set[str] = set()  # the init line is printed once per process, not per round

    def features(self, model_uri: str, images: Any) -> torch.Tensor:
        backbone, meta = load_backbone(model_uri)
        return extract_features(backbone, images, image_size=meta.get("image_size"))

    def check_init(self, init: str, channels: int) -> None:
        """Load `init` once before anything is written: a missing or foreign model is refused early."""
        load_backbone(init, in_channels=channels)

    def guesses(self, model_uri: str, images: torch.Tensor) -> list[int]:
        """The classes a finetuned `model.pt` predicts for a round's (few) images."""
        model, preprocess = load(model_uri)
        with torch.no_grad():
            return model(preprocess(images)).argmax(1).tolist()

    def image_size(self, model_uri: str) -> list[int] | None:
        """The input size recorded with a model (None when it has none)."""
        return load_backbone(model_uri)[1].get("image_size")

    def finetune(self, init, images, labels, classes, out, *, method, epochs, seed, test):
        backbone, meta = load_backbone(init)
        if init not in self._described:
            self._described.add(init)
            click.echo(f"init: {describe(meta)}", err=True)
        model = finetune(backbone, meta, images, labels, len(classes),
                         FinetuneConfig(method=method, epochs=epochs, seed=seed), out=out)
        save_model(store.join(out, "model.pt"), model.backbone, meta["arch"], meta["in_channels"],
                   meta.get("image_size") or list(images.shape[-2:]), classifier=model.fc, classes=list(classes))
        return None if test is None else float((predict(model, test[0]) == test[1]).float().mean())


def load_target(uri: str, image_size: Sequence[int] | None) -> Target:
    """The target, read lazily at `image_size` (the model's, else the manifest's): features are
    extracted batch by batch, and only the labeled samples are ever loaded together."""
    samples = open_samples(uri)
    if not samples.classes:
        raise UserError(f"{uri}: the label stage needs the class names in dataset.json")
    size = image_size_of(samples, image_size, "an --init with a recorded image size")
    return Target(samples.keys(), Fitted(samples, size), samples.labels, list(samples.classes))


def make_annotator(cfg: LabelConfig, target: Target, engine: Engine | None = None) -> Annotator:
    if cfg.annotator == "oracle":
        return OracleAnnotator(target.keys, target.labels)
    index = {key: i for i, key in enumerate(target.keys)}

    def guesses(round_index: int, keys: Sequence[str]) -> dict[str, str] | None:
        """The previous round's model's classes for the keys (round 0 has no classifier yet)."""
        if round_index == 0 or not hasattr(engine, "guesses"):
            return None
        ids = engine.guesses(model_uri(cfg.out, round_index - 1), target.images[[index[k] for k in keys]])
        return {k: target.classes[i] for k, i in zip(keys, ids)}

    return ManualAnnotator(cfg.out, target.classes, lambda key: target.images[index[key]], guesses)
