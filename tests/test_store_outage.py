"""A real S3 server stopped under a running stage (issue 16 item 9).

A short outage is ridden out by the store's retries (the stage finishes); a long one ends the stage
with the infrastructure exit code (69, not the bad-input 2), and a rerun resumes from the last
checkpoint to the same model as the run that never stopped. Its own server (function scope): the
session's must not go down under other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unsupft import checkpoint, store

from tests import seaweedfs
from unsupft.errors import EXIT_INFRA

ROOT = Path(__file__).resolve().parents[1]
# A checkpoint every step: every step writes to the store, so an outage cannot slip between writes.
ARGS = ["--steps", "60", "--checkpoint-every", "1", "--batch-size", "32", "--queue-size", "64", "--workers", "0",
        "--key-momentum", "0.99", "--seed", "3"]


@pytest.fixture
def server(tmp_path: Path):
    control: list[seaweedfs.Server] = []
    with seaweedfs.serve(tmp_path / "weed", bucket="outage", control=control) as s3:
        yield s3, control[0]


def _start(data: Path, out: str, s3: seaweedfs.S3Server, retry_s: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **s3.env(),
           "UNSUPFT_STORE_RETRY_SECONDS": retry_s}
    return subprocess.Popen([sys.executable, "-m", "unsupft", "pretrain", "--data", str(data), "--out", out, *ARGS],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(uri: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not store.exists(uri):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)


def _weights(out: str) -> dict[str, torch.Tensor]:
    return checkpoint.load(store.join(out, "model.pt"))["backbone"]


def test_outage_short_is_ridden_out_long_exits_69_and_rerun_resumes(server, tmp_path, monkeypatch, ingest):
    s3, weed = server
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    store._s3_client.cache_clear()
    ingest("sklearn:digits", tmp_path / "digits", "--classes", "0,1,2,3,4", "--limit", "200")
    data = tmp_path / "digits"

    # 4 s down, 30 s of retries allowed: the stage waits it out and finishes.
    short = f"s3://{s3.bucket}/short"
    proc = _start(data, short, s3, "30")
    _wait_for_checkpoint(store.join(short, "checkpoint.pt"), proc)
    weed.stop()
    time.sleep(4)
    weed.start()
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert store.exists(store.join(short, "_DONE.json"))

    # 10 s down, 2 s of retries: the stage gives up with one line and exit 69 ...
    long = f"s3://{s3.bucket}/long"
    proc = _start(data, long, s3, "2")
    _wait_for_checkpoint(store.join(long, "checkpoint.pt"), proc)
    weed.stop()
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    weed.start()
    assert code == EXIT_INFRA, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unreachable" in lines[0], stderr
    assert not store.exists(store.join(long, "_DONE.json"))
    stopped_at = checkpoint.load(store.join(long, "checkpoint.pt"))["step"]
    assert 0 < stopped_at < 60

    # ... and a rerun resumes from its checkpoint to the model of the run that never stopped.
    rerun = _start(data, long, s3, "30")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    a, b = _weights(short), _weights(long)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_shard_fetched_whole_during_an_outage_is_retried_then_given_up_with_exit_69(server, tmp_path, monkeypatch,
                                                                                     ingest) -> None:
    import threading

    from unsupft.data import open_samples
    from unsupft.data.shardcache import FETCH_AFTER_READS, shard_cache
    from unsupft.errors import InfraError

    s3, weed = server
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("UNSUPFT_CACHE", str(tmp_path / "cache"))
    store._s3_client.cache_clear()
    ingest("sklearn:digits", tmp_path / "digits", "--limit", "200", "--shard-size", "100")
    store.copy_prefix(str(tmp_path / "digits"), f"s3://{s3.bucket}/digits")
    samples = open_samples(f"s3://{s3.bucket}/digits")
    expected = [(tmp_path / "digits" / "shard-000000.tar").read_bytes()]

    # 3 s down, 30 s of retries: the whole-shard GET waits it out and the bytes are the shard's
    monkeypatch.setenv("UNSUPFT_STORE_RETRY_SECONDS", "30")
    for i in range(FETCH_AFTER_READS):
        samples.encoded(i)
    weed.stop()
    restart = threading.Timer(3, weed.start)
    restart.start()
    data = samples.encoded(FETCH_AFTER_READS)
    restart.join()  # back up before the next outage begins (else the timer could end that one)
    assert shard_cache().fetched == 1
    offset, size = int(samples.index.offset[FETCH_AFTER_READS]), int(samples.index.size[FETCH_AFTER_READS])
    assert data == expected[0][offset:offset + size]

    # down for good, 1 s of retries: the next shard's fetch is an InfraError (exit 69), one line
    monkeypatch.setenv("UNSUPFT_STORE_RETRY_SECONDS", "1")
    weed.stop()
    try:
        with pytest.raises(InfraError, match="unreachable") as err:
            for i in range(100, 100 + FETCH_AFTER_READS + 1):
                samples.encoded(i)
        assert err.value.exit_code == EXIT_INFRA and "\n" not in str(err.value)
        assert not list((tmp_path / "cache" / "shards").glob("*.tar"))[1:]  # only shard 0: nothing half-written
    finally:
        weed.start()
