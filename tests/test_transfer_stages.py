"""`unsupft transfer` and `unsupft evaluate` on real digits shards with a tiny backbone."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from unsupft.data import load_arrays
from unsupft.errors import UserError
from unsupft.stages.evaluate import evaluate_command
from unsupft.models import build_backbone, load_backbone, save_model
from unsupft.eval.fewshot import draw_shots
from unsupft.train.transfer import TransferModel, predict
from unsupft.stages.transfer import transfer_command


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ingest):
    """digits split 70/30 into train/test shards, and a randomly initialised tiny model.pt."""
    root = tmp_path_factory.mktemp("digits")
    ingest("sklearn:digits", root / "d", "--split", "0.3", "--seed", "0")
    torch.manual_seed(0)
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    return {"train": str(root / "d" / "train"), "test": str(root / "d" / "test"), "init": str(root / "init"),
            "root": root}


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_draw_shots_exact_reproducible():
    labels = np.repeat(np.arange(4), [5, 9, 3, 7])
    classes = ["a", "b", "c", "d"]
    idx = draw_shots(labels, 3, seed=7, classes=classes)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3, 3] and len(set(idx.tolist())) == 12
    assert np.array_equal(idx, draw_shots(labels, 3, seed=7, classes=classes))
    assert not np.array_equal(idx, draw_shots(labels, 3, seed=8, classes=classes))
    with pytest.raises(UserError, match="class 'c' has only 3"):
        draw_shots(labels, 4, seed=0, classes=classes)


def test_transfer_shots_keys_are_k_per_class_and_disjoint_from_test(digits, tmp_path, one_thread):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        invoke(transfer_command, "--init", digits["init"], "--train", digits["train"], "--shots", 2, "--seed", 5,
               "--epochs", 1, "--out", out)
        outs.append((out / "train_keys.txt").read_text().split())
    train, test = load_arrays(digits["train"]), load_arrays(digits["test"])
    keys = outs[0]
    assert outs[0] == outs[1]  # same seed -> same keys
    label_of = dict(zip(train.keys, train.labels.tolist()))
    assert sorted(np.bincount([label_of[k] for k in keys]).tolist()) == [2] * 10
    assert not set(keys) & set(test.keys)


def test_ce_transfer_beats_chance(digits, tmp_path, one_thread):
    out = tmp_path / "ce"
    invoke(transfer_command, "--init", digits["init"], "--train", digits["train"], "--shots", 20,
           "--epochs", 10, "--batch-size", 50, "--out", out)
    backbone, meta = load_backbone(str(out))
    assert meta["classes"] == [str(i) for i in range(10)] and meta["classifier"] is not None
    model = TransferModel(backbone, 10, meta["image_size"])
    model.fc.load_state_dict(meta["classifier"])
    test = load_arrays(digits["test"])
    accuracy = (predict(model, test.images) == test.labels).float().mean().item()
    assert accuracy > 0.3, accuracy  # chance is 0.1
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(np.isfinite(line["loss"]) for line in lines)
    assert (out / "_DONE.json").exists()


def test_predict_builds_no_autograd_graph(one_thread):
    """Prediction over a whole test set must not keep activations for a backward pass."""
    model = TransferModel(build_backbone("tiny", 1), 10, [8, 8])
    grad_enabled = []
    model.fc.register_forward_hook(lambda module, inputs, output: grad_enabled.append(output.requires_grad))
    predict(model, torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8), batch_size=2)
    assert grad_enabled == [False, False, False]


@pytest.mark.parametrize("method", ["coin", "bituning", "linear"])
def test_other_methods_train(digits, tmp_path, one_thread, method):
    out = tmp_path / method
    invoke(transfer_command, "--init", digits["init"], "--train", digits["train"], "--shots", 2,
           "--epochs", 3, "--method", method, "--coin-alpha", 0.5, "--out", out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(line["loss"]) for line in lines)
    if method == "coin":  # SupCon alone first, then CE + 0.1 SupCon
        assert "ce" not in lines[0] and "ce" in lines[-1]
    if method == "bituning":
        assert {"ce", "contrastive_ce", "categorical"} <= set(lines[0])
    before, _ = load_backbone(digits["init"])
    after, _ = load_backbone(str(out))
    changed = any(not torch.equal(before.state_dict()[k], v) for k, v in after.state_dict().items()
                  if k.endswith("weight"))
    assert changed == (method != "linear")


def test_coin_restarts_the_schedule_for_its_ce_phase(digits, tmp_path, one_thread):
    """COIN's classifier starts training at the CE phase; it gets the peak lr there, not what a
    single cosine over both phases has left of it."""
    out = tmp_path / "coin"
    invoke(transfer_command, "--init", digits["init"], "--train", digits["train"], "--shots", 2,
           "--epochs", 4, "--method", "coin", "--coin-alpha", 0.5, "--out", out)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("ce" in line) for line in lines] == [False, False, True, True]
    assert lines[2]["lr"] == pytest.approx(lines[0]["lr"]) and lines[3]["lr"] == pytest.approx(lines[1]["lr"])
    assert lines[1]["lr"] < lines[0]["lr"]


def test_labels_file_picks_keys_and_overrides_labels(digits, tmp_path, one_thread):
    train = load_arrays(digits["train"])
    chosen = train.keys[:12]
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(f"{k},{i % 10}\n" for i, k in enumerate(chosen)))
    out = tmp_path / "l"
    invoke(transfer_command, "--init", digits["init"], "--train", digits["train"], "--labels",
           tmp_path / "labels.csv", "--epochs", 1, "--out", out)
    assert (out / "train_keys.txt").read_text().split() == chosen


def test_evaluate_writes_full_report(digits, tmp_path, one_thread):
    out = tmp_path / "ev"
    invoke(evaluate_command, "--model", f"scratch={digits['init']}", "--model", f"again={digits['init']}/model.pt",
           "--train", digits["train"], "--test", digits["test"], "--shots", "1,2", "--trials", 2, "--epochs", 2,
           "--out", out)
    for name in ("report.json", "report.html", "feature_map.png", "fewshot_curves.png", "metrics.jsonl",
                 "config.json", "_DONE.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"scratch", "again"}
    for result in report["models"].values():
        assert set(result["fewshot"]) == {"1", "2"}
        numbers = [v for k in ("1", "2") for n, v in result["fewshot"][k].items() if n != "trials"]
        numbers += [result[k] for k in ("retrieval_top5", "cluster_bcubed_precision", "linear_top1")]
        assert all(0.0 <= v <= 1.0 for v in numbers), result
        assert result["sdbw"] > 0
    # Same weights -> same deterministic feature metrics.
    a, b = report["models"]["scratch"], report["models"]["again"]
    assert a["retrieval_top5"] == b["retrieval_top5"] and a["fewshot"] == b["fewshot"]
    assert "<table id=\"metrics\">" in (out / "report.html").read_text()


def run_cli(cli_env, *args):
    return subprocess.run([sys.executable, "-m", "unsupft", *[str(a) for a in args]], env=cli_env,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_exit_2(digits, tmp_path, cli_env, ingest):
    missing = run_cli(cli_env, "transfer", "--init", tmp_path / "nope", "--train", digits["train"], "--out",
                      tmp_path / "o1")
    assert missing.returncode == 2 and "nope" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    too_many = run_cli(cli_env, "evaluate", "--model", f"m={digits['init']}", "--train", digits["train"],
                       "--test", digits["test"], "--shots", "1,500", "--out", tmp_path / "o2")
    assert too_many.returncode == 2 and "class '" in too_many.stderr and "500" in too_many.stderr
    assert len(too_many.stderr.strip().splitlines()) == 1
    ingest("sklearn:digits", tmp_path / "few", "--classes", "0,1,2", "--split", "0.3")
    foreign = run_cli(cli_env, "evaluate", "--model", f"m={digits['init']}", "--train", tmp_path / "few" / "train",
                      "--test", digits["test"], "--metrics", "retrieval", "--out", tmp_path / "o3")
    assert foreign.returncode == 2 and "not in the train set" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # nothing written


def test_transfer_rerun_with_another_config_is_refused_or_starts_clean(digits, tmp_path, one_thread):
    # An output belongs to one config: a rerun asking for 6 epochs into a 3-epoch output is refused
    # with one line naming the difference and leaves every file as it was (before this, it resumed
    # the 3-epoch run and reported the mix as a 6-epoch model); --overwrite starts afresh.
    out = tmp_path / "resume"
    args = ["--init", digits["init"], "--train", digits["train"], "--shots", 5, "--batch-size", 10, "--lr-head", 0.3, "--out", out]
    invoke(transfer_command, *args, "--epochs", 3)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in first] == [5, 10, 15] and (out / "checkpoint.pt").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "_LEASE.json"}
    refused = CliRunner().invoke(transfer_command, [str(a) for a in (*args, "--epochs", 6)])
    assert refused.exit_code == 2 and refused.output.count("error:") == 1, refused.output
    assert "another config (epochs 3 -> 6)" in refused.output and "--overwrite" in refused.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "_LEASE.json"} == before
    invoke(transfer_command, *args, "--epochs", 6, "--overwrite")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[:3] != first  # trained from the start with the 6-epoch schedule, not resumed
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 30
    assert json.loads((out / "config.json").read_text())["epochs"] == 6
