"""Exact resume on the streamed path: `adapt` with replay reading its data from S3 in 2 DataLoader
workers, SIGKILLed after a checkpoint and run again, ends with the weights of an uninterrupted
run that read the same data locally with no workers (so neither the store, the worker count nor
the kill changes what the model sees). The shuffle window is a fraction of the data (epochs read
a window of shards at a time) and the shard cache holds about two shards, so the S3 run fetches,
evicts and fetches again whole shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from unsupft import checkpoint, store
from unsupft.models import build_backbone, save_model

ROOT = str(Path(__file__).resolve().parents[1])
SMALL = ["--batch-size", "32", "--queue-size", "64", "--key-momentum", "0.99", "--image-size", "8"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "unsupft", *map(str, args)]


def test_killed_streaming_run_from_s3_resumes_to_the_weights_of_a_local_run(tmp_path: Path, s3_uri: str,
                                                                             ingest) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "UNSUPFT_SHUFFLE_WINDOW_MB": "0.3",
           "UNSUPFT_SHARD_CACHE_MB": "0.5", "UNSUPFT_CACHE": str(tmp_path / "cache")}
    ingest("sklearn:digits", tmp_path / "src", "--classes", "0,1,2,3,4", "--limit", "300", "--shard-size", "100")
    ingest("sklearn:digits", tmp_path / "tgt", "--classes", "5,6,7,8,9", "--limit", "200", "--shard-size", "50")
    for name in ("src", "tgt"):
        store.copy_prefix(str(tmp_path / name), f"{s3_uri}/{name}")
    save_model(str(tmp_path / "init.pt"), build_backbone("tiny", 1), "tiny", 1, (8, 8))

    def args(data: str, workers: int, out: Path) -> list[str]:
        return command("adapt", "--init", tmp_path / "init.pt", "--target", f"{data}/tgt", "--replay-source",
                       f"{data}/src", "--steps", 24, "--checkpoint-every", 8, "--workers", workers, *SMALL,
                       "--out", out)

    subprocess.run(args(str(tmp_path), 0, tmp_path / "whole"), env=env, check=True, capture_output=True)

    split = tmp_path / "split"
    proc = subprocess.Popen(args(s3_uri, 2, split), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = split / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill after the checkpoint of step 8
        if metrics.exists() and any(json.loads(x)["step"] >= 10 for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.load(str(split / "checkpoint.pt"))["step"] in (8, 16)
    assert not (split / "_DONE.json").exists()
    subprocess.run(args(s3_uri, 2, split), env=env, check=True, capture_output=True)

    assert json.loads((split / "config.json").read_text())["resolved"]["shuffle_window_bytes"] == int(0.3 * 2**20)
    whole = checkpoint.load(str(tmp_path / "whole" / "moco.pt"))["moco"]
    resumed = checkpoint.load(str(split / "moco.pt"))["moco"]
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name
