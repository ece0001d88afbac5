""""How good is my model": `transfer --test`, `evaluate` scoring a model's own classifier, and the
report's sections (cards, best per column, baseline differences, confusion matrices, the label
curve, BCubed P/R/F, the map method), checked in report.json and in the real headless browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from unsupft.data import load_arrays
from unsupft.eval.classifier import confusion_matrix, score_classifier, scores_from_confusion
from unsupft.stages.evaluate import evaluate_command
from unsupft.preprocess import preprocess
from unsupft.models import build_backbone, load, load_backbone, save_model
from unsupft.stages.label import label_command
from unsupft.stages.transfer import transfer_command

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ingest):
    """digits 70/30, a random tiny init, a transfer run scored on the test set, an oracle label run
    scored per round and an evaluate report over the three models (two with classifiers)."""
    root = tmp_path_factory.mktemp("report")
    ingest("sklearn:digits", root / "d", "--split", "0.3", "--seed", "0")
    train, test = str(root / "d" / "train"), str(root / "d" / "test")
    torch.manual_seed(0)
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        invoke(transfer_command, "--init", root / "init", "--train", train, "--shots", 20, "--epochs", 10,
               "--batch-size", 50, "--test", test, "--out", root / "ft")
        invoke(label_command, "--init", root / "init", "--data", train, "--test", test, "--budget", 2,
               "--per-round", 1, "--epochs", 2, "--out", root / "label")
        invoke(evaluate_command, "--model", f"scratch={root / 'init'}", "--model", f"ft={root / 'ft'}",
               "--model", f"lab={root / 'label' / 'model.pt'}", "--train", train, "--test", test,
               "--shots", "1", "--trials", 1, "--epochs", 1, "--baseline", "scratch",
               "--label", f"oracle={root / 'label'}", "--out", root / "ev")
    finally:
        torch.set_num_threads(before)
    return {"root": root, "train": train, "test": test, "ft": root / "ft", "label": root / "label",
            "ev": root / "ev", "init": root / "init"}


class ByBrightness(torch.nn.Module):
    """A classifier with a known answer: the class is the bucket of the image's mean (4 buckets)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # what scoring reads the device from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bucket = ((x.mean(dim=(1, 2, 3)) + 2).clamp(0, 3.99)).long()
        return torch.nn.functional.one_hot(bucket, 4).float() + self.anchor


def test_confusion_and_scores_by_hand():
    confusion = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 2]), 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    scores = scores_from_confusion(confusion, ["a", "b", "c", "d"])
    assert scores["top1"] == 0.75 and scores["per_class"] == {"a": 0.5, "b": 1.0, "c": 1.0}  # no "d" in the test
    assert scores["mean_class"] == pytest.approx(2.5 / 3) and scores["test_samples"] == 4


def test_scoring_in_batches_counts_every_image_once():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 4, 4), generator=g, dtype=torch.uint8)
    truth = ByBrightness()(preprocess(images)).argmax(1).numpy()
    labels = truth.copy()
    labels[:5] = (labels[:5] + 1) % 4  # five wrong on purpose
    whole = score_classifier(ByBrightness(), images, labels, list("abcd"), batch_size=64)
    batched = score_classifier(ByBrightness(), images, labels, list("abcd"), batch_size=4)  # 6 batches, the last of 3
    assert batched == whole and np.sum(whole["confusion"]) == 23
    assert whole["top1"] == pytest.approx(18 / 23)


def class_counts(test_uri: str) -> list[int]:
    return np.bincount(load_arrays(test_uri).labels.numpy(), minlength=10).tolist()


def test_transfer_test_scores_the_finetuned_model(runs):
    score = json.loads((runs["ft"] / "test.json").read_text())
    confusion = np.array(score["confusion"])
    assert confusion.sum(axis=1).tolist() == class_counts(runs["test"])  # rows: every test image once
    # the same model loaded on its own (unsupft.models.load + its preprocessing) predicts the same
    model, preprocess = load(str(runs["ft"]))
    test = load_arrays(runs["test"])
    with torch.no_grad():
        predicted = model(preprocess(test.images)).argmax(1)
    top1 = (predicted == test.labels).float().mean().item()
    assert score["top1"] == pytest.approx(top1) and score["top1"] > 0.3  # chance is 0.1
    per_class = [(predicted[test.labels == c] == c).float().mean().item() for c in range(10)]
    assert [score["per_class"][str(c)] for c in range(10)] == pytest.approx(per_class)
    assert score["mean_class"] == pytest.approx(np.mean(per_class))
    done = json.loads((runs["ft"] / "_DONE.json").read_text())
    assert done["test"]["top1"] == score["top1"] and "test.json" in done["outputs"]
    last = json.loads((runs["ft"] / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_top1"] == score["top1"] and last["test_mean_class"] == score["mean_class"]


def test_evaluate_scores_each_own_classifier_and_keeps_the_fewshot_protocol(runs):
    report = json.loads((runs["ev"] / "report.json").read_text())
    models = report["models"]
    assert "classifier" not in models["scratch"]  # a bare backbone has no classifier to score
    # the transfer model scored by evaluate is the score transfer --test wrote (same model, same set)
    ft_score = json.loads((runs["ft"] / "test.json").read_text())
    assert models["ft"]["classifier"]["confusion"] == ft_score["confusion"]
    for name in ("ft", "lab"):
        confusion = np.array(models[name]["classifier"]["confusion"])
        assert confusion.sum(axis=1).tolist() == class_counts(runs["test"])
        assert set(models[name]["fewshot"]) == {"1"}  # and the backbone still goes through few-shot
    # the label run's last round model is its final model.pt: its score is the last round's top-1
    rounds = [json.loads(line) for line in (runs["label"] / "rounds.jsonl").read_text().splitlines()]
    assert models["lab"]["classifier"]["top1"] == pytest.approx(rounds[-1]["test_top1"])
    for result in models.values():
        p, r, f = (result[f"cluster_bcubed_{k}"] for k in ("precision", "recall", "f"))
        assert 0 < p <= 1 and 0 < r <= 1 and f == pytest.approx(2 * p * r / (p + r))


def test_report_sections_have_real_numbers(runs):
    report = json.loads((runs["ev"] / "report.json").read_text())
    models = report["models"]
    # best per column: the highest top-1 (lowest S_Dbw) of the models
    assert report["best"]["classifier_top1"] == [max(("ft", "lab"), key=lambda n: models[n]["classifier"]["top1"])]
    assert report["best"]["sdbw"] == [min(models, key=lambda n: models[n]["sdbw"])]
    # differences against --baseline scratch
    assert report["baseline"] == "scratch"
    for name in models:
        assert report["differences"][name]["retrieval_top5"] == pytest.approx(
            models[name]["retrieval_top5"] - models["scratch"]["retrieval_top5"])
    assert set(report["differences"]["scratch"].values()) == {0.0}
    # the label curve: one point per round, as rounds.jsonl has them
    rounds = [json.loads(line) for line in (runs["label"] / "rounds.jsonl").read_text().splitlines()]
    curve = report["label_curves"]["oracle"]
    assert len(curve) == len(rounds) >= 2
    assert [(p["round"], p["labels"], p["test_top1"]) for p in curve] == [
        (r["round"], r["labels"], r["test_top1"]) for r in rounds]
    # cards: architecture and the init chain from the manifests
    ft_card = report["cards"]["ft"]
    assert ft_card["architecture"] == "tiny" and ft_card["image_size"] == [8, 8]
    first, brought = ft_card["chain"]
    assert first["stage"] == "transfer" and first["epochs"] == 10 and first["trained_on"] == 200
    sizes = {"train": len(load_arrays(runs["train"]).labels), "test": sum(class_counts(runs["test"]))}
    assert first["data"] == sizes and first["unsupft"] == ft_card["unsupft"] is not None
    assert brought == {"stage": "checkpoint", "uri": str(runs["init"])}
    assert [link["stage"] for link in report["cards"]["lab"]["chain"]] == ["label", "checkpoint"]
    assert report["map_method"] == "t-SNE"
    assert (runs["ev"] / "label_curves.png").stat().st_size > 0


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (apt-get install -y chromium)")
def test_report_page_in_the_browser(runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    counts = class_counts(runs["test"])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto((runs["ev"] / "report.html").as_uri())
        assert page.locator(".card").count() == 3
        assert "tiny" in page.inner_text(".card[data-model='ft']")
        assert page.locator(".card[data-model='ft'] .chain li").count() == 2
        # one marked cell per column (ties aside), differences beside the non-baseline models
        assert page.locator("#metrics td.best").count() >= page.locator("#metrics tr:first-child th").count() - 1
        assert page.locator("#metrics tr[data-model='ft'] .diff").count() > 0
        assert page.locator("#metrics tr[data-model='scratch'] .diff").count() == 0
        # confusion matrices as drawn: each row's cells add up to its class count
        for name in ("ft", "lab"):
            rows = page.eval_on_selector_all(
                f"table.confusion[data-model='{name}'] tr[data-class]",
                "rows => rows.map(r => [...r.querySelectorAll('td.n')].reduce((s, c) => s + Number(c.textContent), 0))")
            assert rows == counts
        # the label curve's points, one row per round, and its picture really decodes
        assert page.locator("table.label-rounds[data-run='oracle'] tr").count() == 1 + len(
            (runs["label"] / "rounds.jsonl").read_text().splitlines())
        assert page.eval_on_selector("img[alt='label_curves.png']", "i => i.naturalWidth") > 100
        assert "t-SNE" in page.inner_text("#map")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    if os.environ.get("UNSUPFT_KEEP_SCREENSHOT"):
        Path(os.environ["UNSUPFT_KEEP_SCREENSHOT"]).write_bytes((tmp_path / "report.png").read_bytes())


def run_cli(cli_env, *args):
    return subprocess.run([sys.executable, "-m", "unsupft", *[str(a) for a in args]], env=cli_env,
                          capture_output=True, text=True, timeout=120)


def one_line_exit_2(result, *words):
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:"), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_bad_report_inputs_are_one_line_and_write_nothing(runs, tmp_path, cli_env, ingest):
    common = ["--train", runs["train"], "--test", runs["test"], "--metrics", "retrieval"]
    one_line_exit_2(run_cli(cli_env, "evaluate", "--model", f"ft={runs['ft']}", *common, "--baseline", "base",
                            "--out", tmp_path / "o1"), "--baseline 'base'", "ft")
    one_line_exit_2(run_cli(cli_env, "evaluate", "--model", f"ft={runs['ft']}", *common, "--label",
                            f"x={runs['ft']}", "--out", tmp_path / "o2"), "not a label stage output")
    ingest("sklearn:digits", tmp_path / "few", "--classes", "0,1,2", "--split", "0.3")
    one_line_exit_2(run_cli(cli_env, "transfer", "--init", runs["init"], "--train", tmp_path / "few" / "train",
                            "--test", runs["test"], "--epochs", 1, "--out", tmp_path / "o3"),
                    "test classes", "not in the train set")
    # a model's own classifier knows 3 classes: a 10-class test set is refused for it, before any write
    invoke(transfer_command, "--init", runs["init"], "--train", tmp_path / "few" / "train", "--shots", 1,
           "--epochs", 1, "--out", tmp_path / "few-ft")
    one_line_exit_2(run_cli(cli_env, "evaluate", "--model", f"few={tmp_path / 'few-ft'}", "--train", runs["train"],
                            "--test", runs["test"], "--out", tmp_path / "o4"), "classifier of --model few")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_image_size_resizes_and_is_the_default_after(runs, tmp_path, one_thread):
    out = tmp_path / "big"
    invoke(transfer_command, "--init", runs["init"], "--train", runs["train"], "--shots", 2, "--epochs", 1,
           "--image-size", 12, "--test", runs["test"], "--out", out)
    _, meta = load_backbone(str(out))
    assert meta["image_size"] == [12, 12] and meta["preprocess"]["image_size"] == [12, 12]
    ev = tmp_path / "ev"  # evaluate takes the 12 x 12 the model records, and --image-size overrides it
    invoke(evaluate_command, "--model", f"big={out}", "--train", runs["train"], "--test", runs["test"],
           "--metrics", "classifier", "--out", ev)
    report = json.loads((ev / "report.json").read_text())
    assert report["cards"]["big"]["image_size"] == [12, 12]
    assert report["models"]["big"]["classifier"]["confusion"] == json.loads((out / "test.json").read_text())["confusion"]
    invoke(evaluate_command, "--model", f"big={out}", "--train", runs["train"], "--test", runs["test"],
           "--metrics", "classifier", "--image-size", 16, "--out", tmp_path / "ev16")
    assert json.loads((tmp_path / "ev16" / "report.json").read_text())["cards"]["big"]["image_size"] == [16, 16]
