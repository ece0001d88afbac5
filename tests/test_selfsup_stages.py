"""`unsupft pretrain`, `adapt`, `bn-adapt` as subprocesses on real shards (sklearn digits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unsupft import checkpoint, store
from unsupft.models import build_backbone, load_backbone, save_model

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
SMALL = ["--batch-size", "32", "--queue-size", "64", "--workers", "0", "--key-momentum", "0.99"]


def unsupft(*args, check=True, **kw):
    env = {**os.environ, **ENV}  # read now: S3 tests set the server's settings per test
    proc = subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], env=env, capture_output=True,
                          text=True, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    unsupft("ingest", "sklearn:digits", root / "src", "--classes", "0,1,2,3,4", "--limit", "300")
    unsupft("ingest", "sklearn:digits", root / "tgt", "--classes", "5,6,7,8,9", "--limit", "200")
    return root


def test_pretrain_writes_the_stage_outputs_and_chains(digits, tmp_path):
    out = tmp_path / "base"
    unsupft("pretrain", "--data", digits / "src", "--out", out, "--steps", 6, "--checkpoint-every", 3, *SMALL)
    assert {"model.pt", "moco.pt", "metrics.jsonl", "config.json", "_DONE.json"} <= {p.name for p in out.iterdir()}
    done = json.loads((out / "_DONE.json").read_text())
    assert done["stage"] == "pretrain" and done["inputs"]["data"] == str(digits / "src")
    backbone, meta = load_backbone(str(out))
    assert meta["arch"] == "tiny" and meta["in_channels"] == 1 and meta["image_size"] == [8, 8]
    moco = checkpoint.load(str(out / "moco.pt"))
    assert moco["queue_size"] == 64 and "head.0.weight" in moco["moco"]

    # HPT chain with HPT-BN and TUP: the head comes along, only BN affine params (and head) train
    nxt = tmp_path / "target"
    unsupft("pretrain", "--data", digits / "src", "--target", digits / "tgt", "--target-ratio", 0.5, "--init", out,
            "--freeze", "bn-only", "--out", nxt, "--steps", 3, *SMALL)
    config = json.loads((nxt / "config.json").read_text())
    assert config["resolved"]["head"] == "loaded" and config["resolved"]["samples_per_epoch"] == 300 + 150
    after, _ = load_backbone(str(nxt))
    for name, value in backbone.state_dict().items():
        same = torch.equal(value, after.state_dict()[name])
        assert same != ("bn" in name or "downsample.1" in name), name

    adapted = tmp_path / "adapted"
    unsupft("adapt", "--init", nxt, "--target", digits / "tgt", "--replay-source", digits / "src", "--out", adapted,
            "--steps", 3, *SMALL)
    config = json.loads((adapted / "config.json").read_text())
    assert config["resolved"]["replayed_images"] == 30 and config["mix"] == "cutmix"
    assert config["resolved"]["samples_per_epoch"] == 230
    assert "mix" in json.loads((adapted / "metrics.jsonl").read_text().splitlines()[-1])

    bn = tmp_path / "bn"
    unsupft("bn-adapt", "--init", out, "--data", digits / "tgt", "--out", bn)
    adapted_bn, _ = load_backbone(str(bn))
    # running statistics move to the target's, weights stay
    assert not torch.equal(adapted_bn.bn1.running_mean, backbone.bn1.running_mean)
    assert torch.equal(adapted_bn.conv1.weight, backbone.conv1.weight)


def test_queue_size_follows_the_epoch_and_config_says_why(digits, tmp_path):
    """The default queue ("auto") never holds more keys than an epoch has samples, so no image is
    its own negative; an explicit larger queue is kept, with a warning naming both numbers."""
    fast = ["--workers", "0", "--key-momentum", "0.99", "--steps", 1]
    auto = tmp_path / "auto"
    unsupft("pretrain", "--data", digits / "src", "--out", auto, "--batch-size", 64, *fast)
    resolved = json.loads((auto / "config.json").read_text())["resolved"]
    assert resolved["queue_size"] == 256 and "epoch (300 samples)" in resolved["queue_size_reason"]
    assert checkpoint.load(str(auto / "moco.pt"))["queue_size"] == 256
    assert json.loads((auto / "config.json").read_text())["queue_size"] == "auto"  # the hash sees "auto"

    # adapt's epoch is the target plus the replayed source subset: 200 + 30
    adapted = tmp_path / "adapted"
    unsupft("adapt", "--init", auto, "--target", digits / "tgt", "--replay-source", digits / "src",
            "--out", adapted, "--batch-size", 32, *fast)
    assert json.loads((adapted / "config.json").read_text())["resolved"]["queue_size"] == 224

    given = tmp_path / "given"
    proc = unsupft("pretrain", "--data", digits / "src", "--out", given, "--batch-size", 64, "--queue-size", 1024, *fast)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1024" in warnings[0] and "300" in warnings[0]
    resolved = json.loads((given / "config.json").read_text())["resolved"]
    assert (resolved["queue_size"], resolved["queue_size_reason"]) == (1024, "given")


def test_queue_size_for_rounds_to_batches_and_caps():
    from unsupft.stages.moco_common import queue_size_for

    assert queue_size_for("auto", 1258, 256)[0] == 1024
    assert queue_size_for("auto", 60000, 256)[0] == 59904
    assert queue_size_for("auto", 1_281_167, 256) == (65536, "auto: the cap 65536 rounded down to a multiple of the batch (256)")
    assert queue_size_for("auto", 100, 256)[0] == 256  # an epoch smaller than a batch: one batch of keys
    assert queue_size_for(4096, 60000, 256) == (4096, "given")


@pytest.mark.parametrize("args,message", [
    (["--init", "{tmp}/missing.pt"], "no checkpoint there"),
    (["--init", "{tmp}/r18.pt", "--arch", "tiny"], "holds a resnet18 backbone, but tiny"),
    (["--target", "{digits}/tgt", "--target-ratio", "1.5"], "'--target-ratio': 1.5 is not in the range 0<x<1"),
    (["--data", "{tmp}/empty"], "the data set is empty"),
    (["--data", "{tmp}/nothing"], "incomplete data set"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(digits, tmp_path, args, message):
    save_model(str(tmp_path / "r18.pt"), build_backbone("resnet18", 1), "resnet18", 1, (8, 8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text(json.dumps({
        "format": "unsupft-shards/1", "samples": 0, "classes": [], "labeled": False, "image_size": [8, 8],
        "channels": 1, "shards": [], "source": "test", "created": 0}))
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, digits=digits) for a in args]
    base = [] if "--data" in args else ["--data", str(digits / "src")]
    proc = unsupft("pretrain", *base, *args, "--out", out, "--steps", 2, *SMALL, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert not out.exists()


def test_killed_run_resumes_to_the_same_weights(digits, tmp_path):
    args = ["adapt", "--init", tmp_path / "init.pt", "--target", digits / "tgt", "--replay-source", digits / "src",
            "--steps", 24, "--checkpoint-every", 8, *SMALL]
    save_model(str(tmp_path / "init.pt"), build_backbone("tiny", 1), "tiny", 1, (8, 8))
    unsupft(*args, "--out", tmp_path / "whole")

    cmd = [sys.executable, "-m", "unsupft", *map(str, args), "--out", str(tmp_path / "split")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "split" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill after the checkpoint of step 8, before the end
        if metrics.exists() and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(str(tmp_path / "split" / "checkpoint.pt"))["step"] in (8, 16)
    assert not (tmp_path / "split" / "_DONE.json").exists()
    unsupft(*args, "--out", tmp_path / "split")

    whole = checkpoint.load(str(tmp_path / "whole" / "moco.pt"))["moco"]
    split = checkpoint.load(str(tmp_path / "split" / "moco.pt"))["moco"]
    for name, value in whole.items():
        assert torch.allclose(value.float(), split[name].float(), atol=1e-5), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 24]


def test_two_process_ddp_pretrain_with_shuffle_bn(digits, tmp_path):
    """torchrun with 2 CPU processes (Gloo): DDP, shuffle-BN across ranks, gathered queue and RNG states."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "unsupft", "pretrain", "--data", str(digits / "src"), "--out", str(out), "--steps", "4",
         "--checkpoint-every", "2", *SMALL],
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},  # Gloo on the CPU, also where one GPU is visible
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = checkpoint.load(str(out / "checkpoint.pt"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 4
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks draw differently
    assert int(state["model"]["queue_ptr"]) == 4 * 32 % 64  # global batches of 32 enqueued from both ranks
    assert (out / "_DONE.json").exists()


def test_pretrain_to_s3_and_skip_when_done(digits, s3_uri):
    args = ["pretrain", "--data", digits / "src", "--out", s3_uri, "--steps", 4, "--checkpoint-every", 2, *SMALL]
    unsupft(*args)
    backbone, meta = load_backbone(s3_uri)
    assert meta["arch"] == "tiny"
    assert [json.loads(x)["step"] for x in store.read_text(f"{s3_uri}/metrics.jsonl").splitlines()] == [4]
    again = unsupft(*args)
    assert "already done" in again.stderr


def test_a_finished_stage_skips_before_reading_its_inputs_and_a_changed_input_reruns(digits, tmp_path):
    # The config hash covers the options and the inputs' manifests, not facts read from the data, so
    # the done check needs neither the images nor the init's weights (issue 15).
    import shutil

    target = tmp_path / "tgt"
    shutil.copytree(digits / "tgt", target)
    base, adapted = tmp_path / "base", tmp_path / "adapted"
    unsupft("pretrain", "--data", digits / "src", "--out", base, "--steps", 2, *SMALL)
    args = ["adapt", "--init", base, "--target", target, "--out", adapted, "--steps", 2, *SMALL]
    unsupft(*args)
    for weights in ("model.pt", "moco.pt", "checkpoint.pt"):
        (base / weights).unlink()
    for shard in target.glob("*.tar"):
        shard.unlink()
    again = unsupft(*args)
    assert "already done" in again.stderr
    # the same target URI holding other images: its manifest changed, so the output is another config's
    shutil.rmtree(target)
    unsupft("ingest", "sklearn:digits", target, "--classes", "5,6,7,8,9", "--limit", "150")
    changed = unsupft(*args, check=False)
    assert changed.returncode == 2 and "another config (input_manifests" in changed.stderr, changed.stderr
