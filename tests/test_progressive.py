"""The label loop: budget accounting, resume after a kill anywhere, no key asked twice, a manual run.

The loop logic is tested with a small stand-in engine (pixel features, nearest-centroid "finetuning")
so that each test takes a second; the real finetuning is exercised by tests/test_label_stage.py.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from sklearn.datasets import load_digits

from unsupft import checkpoint, store
from unsupft.select.annotators import (
    ManualAnnotator,
    OracleAnnotator,
    WaitingForLabels,
    labels_uri,
    read_request,
    read_requested_keys,
)
from unsupft.select.progressive import LabelConfig, State, Target, make_annotator, run_label


def digits_target(n=400) -> Target:
    d = load_digits()
    images = torch.from_numpy((d.images[:n] * 255 / 16).round()).to(torch.uint8)[:, None]
    return Target([f"d{i:04d}" for i in range(n)], images, torch.from_numpy(d.target[:n]).long(),
                  [str(c) for c in range(10)])


class Killed(Exception):
    """Stands for the process being killed at that point."""


class StandIn:
    """Pixel features; 'finetuning' = class centroids of the labeled images, saved as model.pt."""

    def __init__(self, kill_at: tuple[str, int] | None = None) -> None:
        self.kill_at, self.calls = kill_at, []

    def _maybe_die(self, what: str, round_index: int) -> None:
        self.calls.append((what, round_index))
        if self.kill_at == (what, round_index):
            raise Killed(what)

    def features(self, model_uri, images):
        self._maybe_die("features", -1 if model_uri == "init" else int(model_uri.split("round-")[1].split("/")[0]) + 1)
        return images.flatten(1).float()

    def finetune(self, init, images, labels, classes, out, *, method, epochs, seed, test):
        assert init == "init", "every round finetunes from --init"
        self._maybe_die("finetune", int(out.rsplit("round-", 1)[1]))
        x = images.flatten(1).float()
        centroids = torch.stack([x[labels == c].mean(0) if (labels == c).any() else torch.full_like(x[0], 1e9)
                                 for c in range(len(classes))])
        checkpoint.save(store.join(out, "model.pt"), {"centroids": centroids})
        if test is None:
            return None
        pred = torch.cdist(test[0].flatten(1).float(), centroids).argmin(1)
        return float((pred == test[1]).float().mean())


class CountingOracle(OracleAnnotator):
    def __init__(self, target, asked, kill_round=None):
        super().__init__(target.keys, target.labels)
        self.asked, self.kill_round = asked, kill_round

    def annotate(self, round_index, keys):
        if round_index == self.kill_round:
            raise Killed("annotate")
        self.asked.extend(keys)
        return super().annotate(round_index, keys)


def config(tmp_path, **kw) -> LabelConfig:
    return LabelConfig(**{"init": "init", "data": "unused", "out": str(tmp_path / "label"),
                          "budget": 3, "per_round": 2, "epochs": 1, **kw})


def read_labels_csv(out):
    return list(csv.DictReader(io.StringIO(store.read_text(f"{out}/labels.csv"))))


@pytest.mark.parametrize("selector", ["ackmeans", "random"])
def test_budget_rounds_and_outputs(tmp_path, selector):
    target = digits_target()
    cfg = config(tmp_path, selector=selector)
    asked = []
    test = (target.images[300:], target.labels[300:])
    state = run_label(cfg, target, CountingOracle(target, asked), StandIn(), test, log=lambda _: None)
    # 10 initial (one per class) + budget 3*10 extra in rounds of 2*10: 20, then the 10 left
    rounds = [json.loads(line) for line in store.read_text(f"{cfg.out}/rounds.jsonl").splitlines()]
    assert [r["labels"] for r in rounds] == [10, 30, 40] and state.phase == "done"
    assert sorted(rounds[0]["per_class"].values()) == [1] * 10
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in rounds)
    assert len(asked) == len(set(asked)) == 40
    rows = read_labels_csv(cfg.out)
    assert [r["key"] for r in rows] == asked
    truth = dict(zip(target.keys, target.labels.tolist()))
    assert all(int(r["label"]) == truth[r["key"]] for r in rows)
    assert [int(r["round"]) for r in rows] == [0] * 10 + [1] * 20 + [2] * 10
    assert store.exists(f"{cfg.out}/rounds/round-2/model.pt")


def test_ackmeans_rounds_cover_more_classes_than_random(tmp_path):
    """With pixel features of digits the eigen-samples spread over the classes."""
    target = digits_target()
    seen = {}
    for selector in ("ackmeans", "random"):
        cfg = config(tmp_path / selector, selector=selector, budget=1, per_round=1)
        run_label(cfg, target, CountingOracle(target, []), StandIn(), log=lambda _: None)
        round1 = [int(r["label"]) for r in read_labels_csv(cfg.out) if r["round"] == "1"]
        seen[selector] = len(set(round1))
    assert seen["ackmeans"] >= 6


@pytest.mark.parametrize("kill", [("features", 2), ("annotate", 2), ("finetune", 2), ("finetune", 0)])
def test_resume_after_a_kill_gives_the_same_run(tmp_path, kill):
    target = digits_target()
    reference_cfg = config(tmp_path / "ref")
    reference = run_label(reference_cfg, target, CountingOracle(target, []), StandIn(), log=lambda _: None)

    cfg = config(tmp_path / "killed")
    asked = []
    engine = StandIn(kill_at=kill if kill[0] != "annotate" else None)
    oracle = CountingOracle(target, asked, kill_round=kill[1] if kill[0] == "annotate" else None)
    with pytest.raises(Killed):
        run_label(cfg, target, oracle, engine, log=lambda _: None)
    before = State.load(cfg.out)
    assert before.round == kill[1]
    resumed_engine = StandIn()
    state = run_label(cfg, target, CountingOracle(target, asked), resumed_engine, log=lambda _: None)
    assert len(asked) == len(set(asked)), "a key was requested twice"
    assert state.labeled == reference.labeled and state.rounds == reference.rounds
    # the resumed run did not redo finished rounds
    assert ("finetune", 0) not in resumed_engine.calls or kill == ("finetune", 0)
    assert all(r >= kill[1] for _, r in resumed_engine.calls if r >= 0)


def test_manual_rounds_end_to_end(tmp_path):
    target = digits_target(300)
    cfg = config(tmp_path, annotator="manual", budget=2, per_round=1)
    index = {k: i for i, k in enumerate(target.keys)}
    manual = ManualAnnotator(cfg.out, target.classes, lambda k: target.images[index[k]])
    supplied: dict[str, str] = {}
    requested: list[str] = []
    for round_index in range(3):
        with pytest.raises(WaitingForLabels) as waiting:
            run_label(cfg, target, manual, StandIn(), log=lambda _: None)
        assert f"labels/round-{round_index}.csv" in str(waiting.value)
        keys = read_requested_keys(cfg.out, round_index)
        assert len(keys) == 10 and store.exists(f"{cfg.out}/requests/round-{round_index}/{keys[0]}.png")
        requested += keys
        answer = {k: target.classes[int(target.labels[index[k]])] for k in keys}
        supplied.update(answer)
        store.write_text(labels_uri(cfg.out, round_index),
                         "key,label\n" + "".join(f"{k},{v}\n" for k, v in answer.items()))
    state = run_label(cfg, target, manual, StandIn(), log=lambda _: None)
    assert state.phase == "done" and len(requested) == len(set(requested)) == 30
    final = {r["key"]: r["label"] for r in read_labels_csv(cfg.out)}
    assert final == supplied, "final labels must be exactly the union of the returned files"


class GuessingStandIn(StandIn):
    """StandIn whose round models also guess (nearest centroid), as TransferEngine does."""

    def guesses(self, model_uri, images):
        centroids = checkpoint.load(model_uri)["centroids"]
        return torch.cdist(images.flatten(1).float(), centroids).argmin(1).tolist()


def test_unsure_answers_cost_no_budget_and_rounds_carry_guesses(tmp_path):
    target = digits_target(300)
    cfg = config(tmp_path, annotator="manual", budget=1, per_round=1)
    engine = GuessingStandIn()
    manual = make_annotator(cfg, target, engine)
    truth = {k: target.classes[int(y)] for k, y in zip(target.keys, target.labels)}
    sizes, unsure = [], []
    for round_index in range(3):
        with pytest.raises(WaitingForLabels):
            run_label(cfg, target, manual, engine, log=lambda _: None)
        keys, guesses = read_request(cfg.out, round_index)
        sizes.append(len(keys))
        if round_index == 0:
            assert guesses == {}  # no classifier yet
        else:  # the previous round's model's guess for every key
            assert set(guesses) == set(keys) and set(guesses.values()) <= set(target.classes)
            assert sum(guesses[k] == truth[k] for k in keys) >= 3  # chance: 1 in 10
        skipped = keys[:3] if round_index == 1 else []  # "not sure" about three images in round 1
        unsure += skipped
        store.write_text(labels_uri(cfg.out, round_index),
                         "key,label\n" + "".join(f"{k},{'?' if k in skipped else truth[k]}\n" for k in keys))
    state = run_label(cfg, target, manual, engine, log=lambda _: None)
    assert sizes == [10, 10, 3]  # the three unsure answers did not spend budget: asked for again
    assert state.phase == "done" and len(state.labeled) == 20
    assert [r["labels"] for r in state.rounds] == [10, 17, 20]
    answered_unsure = {k for k, _, r in state.labeled if k in unsure and r == 1}
    assert not answered_unsure  # an unsure image never carries a label from the round it was skipped in
