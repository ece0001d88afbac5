"""`unsupft semi` (FixMatch): its loss against a slow transcription, and the stage on real digits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from unsupft import checkpoint, store
from unsupft.ctl import spec
from unsupft.ctl.command import check_options, stage_args
from unsupft.data import load_arrays
from unsupft.errors import UserError
from unsupft.losses import fixmatch_loss
from unsupft.models import build_backbone, load, save_model
from unsupft.stages.semi import semi_command


def slow_fixmatch(labeled, labels, weak, strong, threshold, weight):
    """Eq. 4 of FixMatch, sample by sample: CE on the labeled rows, and for each unlabeled row the
    strong view's CE against the weak view's arg-max when its top probability reaches the threshold."""

    def ce(row, target):
        return -math.log(math.exp(float(row[target])) / sum(math.exp(float(v)) for v in row))

    supervised = sum(ce(labeled[i], int(labels[i])) for i in range(len(labels))) / len(labels)
    unlabeled, kept = 0.0, []
    for u in range(len(weak)):
        probs = [math.exp(float(v)) for v in weak[u]]
        probs = [p / sum(probs) for p in probs]
        pseudo = max(range(len(probs)), key=probs.__getitem__)
        kept.append(probs[pseudo] >= threshold)
        if kept[-1]:
            unlabeled += ce(strong[u], pseudo)
    unlabeled /= len(weak)
    return supervised + weight * unlabeled, supervised, unlabeled, kept


@pytest.mark.parametrize("seed,threshold,weight", [(0, 0.95, 1.0), (1, 0.5, 2.5), (2, 0.3, 0.0), (3, 1.0, 1.0)])
def test_fixmatch_loss_matches_loop(seed, threshold, weight):
    g = torch.Generator().manual_seed(seed)
    labeled = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (6,), generator=g)
    weak = torch.randn(21, 5, generator=g, dtype=torch.float64) * 4  # large logits: some rows pass 0.95
    strong = torch.randn(21, 5, generator=g, dtype=torch.float64)
    got = fixmatch_loss(labeled, labels, weak, strong, threshold, weight)
    total, supervised, unlabeled, kept = slow_fixmatch(labeled, labels, weak, strong, threshold, weight)
    assert got.mask.tolist() == [float(k) for k in kept]
    assert got.supervised.item() == pytest.approx(supervised, rel=1e-9)
    assert got.unlabeled.item() == pytest.approx(unlabeled, rel=1e-9, abs=1e-12)
    assert got.total.item() == pytest.approx(total, rel=1e-9)
    if seed == 0:
        assert 0 < sum(kept) < len(kept)  # the threshold really splits this draw


def test_fixmatch_pseudo_labels_are_targets_not_trained():
    """The weak view only provides targets: no gradient reaches it; the strong view gets one only on
    confident rows (here the weak view is confident on row 0 alone)."""
    weak = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    strong = torch.zeros(2, 3, requires_grad=True)
    labeled = torch.zeros(1, 3, requires_grad=True)
    loss = fixmatch_loss(labeled, torch.tensor([1]), weak, strong, threshold=0.95)
    loss.total.backward()
    assert weak.grad is None or not weak.grad.any()
    assert strong.grad[0].abs().sum() > 0 and not strong.grad[1].any()
    assert strong.grad[0, 0] < 0  # pushed toward the weak view's class 0
    assert loss.mask.tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# The stage on real digits shards with a tiny backbone
# ------------------------------------------------------------------------------------------------

ROOT = str(Path(__file__).resolve().parents[1])
SMALL = ["--shots", "3", "--batch-size", "10", "--mu", "2", "--threshold", "0.3", "--lr-head", "0.5", "--workers", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ingest):
    """digits 70/30 train/test, two disjoint unlabeled sets (other images of the same classes), and a
    randomly initialised tiny model.pt."""
    root = tmp_path_factory.mktemp("semi")
    ingest("sklearn:digits", root / "d", "--split", "0.3", "--seed", "0")
    ingest("sklearn:digits", root / "u", "--split", "0.5", "--seed", "1", "--limit", "200", "--unlabeled")
    torch.manual_seed(0)
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    return {"train": str(root / "d" / "train"), "test": str(root / "d" / "test"), "init": str(root / "init"),
            "unlabeled_a": str(root / "u" / "train"), "unlabeled_b": str(root / "u" / "test"), "root": root}


def semi(digits, out, *args):
    result = CliRunner().invoke(semi_command, ["--init", digits["init"], "--train", digits["train"], *SMALL,
                                               *map(str, args), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out) -> dict[str, torch.Tensor]:
    return checkpoint.load(str(out / "model.pt"))["backbone"]


def test_semi_learns_from_the_unlabeled_images(digits, tmp_path, one_thread):
    """Another unlabeled set gives other weights; with the unlabeled loss off it does not matter
    which set is named (it is not read), and the metrics carry no pseudo-label rate."""
    runs = {}
    for weight in ("1", "0"):
        for which in ("unlabeled_a", "unlabeled_b"):
            out = tmp_path / f"{which}-{weight}"
            lines = semi(digits, out, "--unlabeled", digits[which], "--unlabeled-weight", weight, "--steps", 4,
                         "--checkpoint-every", 2, "--test", digits["test"])
            runs[weight, which] = out, lines
    for which in ("unlabeled_a", "unlabeled_b"):
        out, lines = runs["1", which]
        assert len(lines) == 2 and all({"ce", "unlabeled", "pseudo_label_rate"} <= set(line) for line in lines)
        assert any(line["pseudo_label_rate"] > 0 for line in lines)
        done = json.loads((out / "_DONE.json").read_text())
        assert done["unlabeled_images"] == 100 and "unlabeled" in done["inputs"]
        assert 0 <= done["final_metrics"]["test_top1"] <= 1
        out, lines = runs["0", which]
        assert all("pseudo_label_rate" not in line and "unlabeled" not in line for line in lines)
        done = json.loads((out / "_DONE.json").read_text())
        assert done["unlabeled_images"] == 0 and "unlabeled" not in done["inputs"]
    a, b = weights(runs["1", "unlabeled_a"][0]), weights(runs["1", "unlabeled_b"][0])
    assert any(not torch.equal(a[k], b[k]) for k in a)
    a, b = weights(runs["0", "unlabeled_a"][0]), weights(runs["0", "unlabeled_b"][0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_semi_model_is_the_ema_with_its_classifier(digits, tmp_path, one_thread):
    out = tmp_path / "m"
    semi(digits, out, "--unlabeled", digits["unlabeled_a"], "--steps", 3, "--checkpoint-every", 3)
    model, preprocess = load(str(out))
    assert model.classes == [str(i) for i in range(10)]
    test = load_arrays(digits["test"])
    logits = model(preprocess(test.images[:16]))
    assert logits.shape == (16, 10)
    # The saved weights are the EMA's: the checkpoint's average (2 updates in) moved once more
    # toward the trained weights, with the warm-up decay of the 3rd update, 3 / (9 + 3).
    trained = checkpoint.load(str(out / "checkpoint.pt"))["model"]
    saved = weights(out)
    name = next(k for k in saved if k.endswith("weight") and saved[k].ndim > 1)
    average, current = trained[f"ema.backbone.{name}"], trained[f"model.backbone.{name}"]
    assert torch.allclose(saved[name], average + (1 - 3 / 12) * (current - average), atol=1e-6)
    assert not torch.allclose(saved[name], current, atol=1e-6)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "unsupft", *map(str, args)]


def test_killed_semi_resumes_to_the_weights_of_an_uninterrupted_run(digits, tmp_path, s3_uri):
    """The unlabeled set streams from S3 in 2 workers in the killed run, from local shards without
    workers in the uninterrupted one: neither the store, the workers nor the kill changes the result."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    store.copy_prefix(digits["unlabeled_a"], f"{s3_uri}/u")

    def args(unlabeled: str, workers: int, out: Path) -> list[str]:
        small = [a if a != "0" or SMALL[i - 1] != "--workers" else str(workers) for i, a in enumerate(SMALL)]
        return command("semi", "--init", digits["init"], "--train", digits["train"], "--unlabeled", unlabeled,
                       *small, "--steps", 12, "--checkpoint-every", 2, "--out", out)

    subprocess.run(args(digits["unlabeled_a"], 0, tmp_path / "whole"), env=env, check=True, capture_output=True)
    split = tmp_path / "split"
    proc = subprocess.Popen(args(f"{s3_uri}/u", 2, split), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    metrics = split / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill after the checkpoint of step 4 or so
        if metrics.exists() and any(json.loads(x)["step"] >= 6 for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(str(split / "checkpoint.pt"))["step"] in (2, 4, 6, 8, 10)
    assert not (split / "_DONE.json").exists()
    subprocess.run(args(f"{s3_uri}/u", 2, split), env=env, check=True, capture_output=True)
    whole, resumed = checkpoint.load(str(tmp_path / "whole" / "model.pt")), checkpoint.load(str(split / "model.pt"))
    for part in ("backbone", "classifier"):
        for name, value in whole[part].items():
            assert torch.equal(value, resumed[part][name]), (part, name)


def run_cli(cli_env, *args):
    return subprocess.run(command(*args), env=cli_env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bad,expected", [
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "1.5"], "--threshold"),
    (["--shots", "500"], "fewer than --shots 500"),
    (["--mu", "0"], "--mu"),
    (["--unlabeled", "{root}/nope"], "nope"),
    (["--test", "{root}/u/train"], "labeled"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(digits, tmp_path, cli_env, bad, expected):
    bad = [a.format(root=digits["root"]) for a in bad]
    defaults = {"--unlabeled": digits["unlabeled_a"], "--shots": "2", "--threshold": "0.95"}
    for flag, value in defaults.items():
        if flag not in bad:
            bad += [flag, value]
    result = run_cli(cli_env, "semi", "--init", digits["init"], "--train", digits["train"], "--steps", 1, *bad,
                     "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines
    assert not (tmp_path / "o").exists()


PIPELINE = """\
name: semi
store: file:///tmp/unsupft-store
datasets: {labeled: file:///data/tgt/train, pool: file:///data/tgt/unlabeled, test: file:///data/tgt/test}
stages:
  base: {kind: pretrain, data: [pool], arch: tiny, steps: 20}
  fixmatch: {kind: semi, init: base, train: labeled, unlabeled: pool, test: test, shots: 4, threshold: 0.9}
"""


def test_semi_is_a_pipeline_stage_kind():
    pipeline = spec.parse(PIPELINE, "semi.yaml")
    assert pipeline.stages["fixmatch"].needs == ("base",)
    assert stage_args(pipeline.stages["fixmatch"], "/r") == [
        "semi", "--init", "/r/base", "--train", "/data/tgt/train", "--unlabeled", "/data/tgt/unlabeled",
        "--test", "/data/tgt/test", "--shots", "4", "--threshold", "0.9", "--out", "/r/fixmatch"]
    check_options(pipeline, "semi.yaml")
    with pytest.raises(UserError, match="semi.yaml:6: stages.fixmatch.threshold: 0.0 is not in the range"):
        check_options(spec.parse(PIPELINE.replace("threshold: 0.9", "threshold: 0"), "semi.yaml"), "semi.yaml")
