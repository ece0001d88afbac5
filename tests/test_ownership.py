"""Outputs owned by one config and one writer (issue 16 items 1-3), on a local disk and on S3.

The stages run as real processes on real shards (sklearn digits, tiny backbone, a few steps); the
controller tests use the stand-in stages of tests/ctl_fake_stages.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_ctl_local import _pipeline
from unsupft import lease, store
from unsupft.errors import EXIT_INFRA, InfraError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "32", "--queue-size", "64", "--workers", "0", "--key-momentum", "0.99"]


def unsupft(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], env=full, capture_output=True,
                          text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own-digits")
    assert unsupft("ingest", "sklearn:digits", root / "src", "--classes", "0,1,2,3,4", "--limit", "200").returncode == 0
    return root / "src"


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != lease.LEASE}


def test_rerun_with_another_seed_is_refused_and_overwrite_starts_clean(digits, tmp_path):
    # The case: seed 1 into seed 0's output used to exit 0 with seed 0's model.
    out = tmp_path / "w"
    base = ["pretrain", "--data", digits, "--out", out, "--steps", 4, *SMALL]
    assert unsupft(*base, "--seed", 0).returncode == 0
    before = snapshot(out)
    refused = unsupft(*base, "--seed", 1)
    assert refused.returncode == 2
    line = one_error_line(refused)
    assert "another config (seed 0 -> 1)" in line and str(out) in line
    assert snapshot(out) == before  # nothing written or changed

    # A partial output (killed before _DONE.json) belongs to its config just the same.
    (out / "_DONE.json").unlink()
    partial = snapshot(out)
    refused = unsupft(*base, "--seed", 1)
    assert refused.returncode == 2 and "seed 0 -> 1" in one_error_line(refused) and snapshot(out) == partial

    assert unsupft(*base, "--seed", 1, "--overwrite").returncode == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert (out / "model.pt").read_bytes() != before["model.pt"]  # trained afresh under seed 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [4]


def test_foreign_files_in_out_are_refused(digits, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = unsupft("pretrain", "--data", digits, "--out", out, "--steps", 2, *SMALL)
    assert refused.returncode == 2 and "holds no config.json" in one_error_line(refused)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_refuses_a_checkpoint_written_under_another_config(digits, tmp_path):
    # An output made by an older unsupft could pair one config.json with another config's
    # checkpoint (the item 1): the checkpoint records its owner, so resuming checks it.
    out = tmp_path / "mixed"
    base = ["pretrain", "--data", digits, "--out", out, "--steps", 4, "--checkpoint-every", 2, *SMALL]
    assert unsupft(*base, "--seed", 0).returncode == 0
    for name in ("_DONE.json", "model.pt", "moco.pt"):
        (out / name).unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "seed": 1}, indent=2, sort_keys=True) + "\n")  # seed 1
    before = snapshot(out)
    refused = unsupft(*base, "--seed", 1)
    assert refused.returncode == 2
    assert "checkpoint.pt: written under another stage config" in one_error_line(refused)
    assert snapshot(out) == before
    # The same config resumes as before.
    (out / "config.json").write_text(json.dumps(config))
    assert unsupft(*base, "--seed", 0).returncode == 0 and (out / "_DONE.json").exists()


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)], ids=["same-config", "other-seed"])
def test_two_writers_on_one_output_one_wins_the_other_stops(digits, store_uri, s3_server, seeds):
    # Two identical runs used to double every metrics.jsonl line; two seeds gave a model matching
    # neither. Now the second to claim the output stops with one line: the writer lease (exit 69)
    # or, when it already sees the winner's config.json, the ownership check (exit 2).
    out = store.join(store_uri, "both")
    cmd = [sys.executable, "-m", "unsupft", "pretrain", "--data", str(digits), "--out", out, "--steps", "40", *SMALL]
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **s3_server.env()}
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in seeds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = [code for code, _ in results]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] in ((EXIT_INFRA,) if seeds[0] == seeds[1] else (2, EXIT_INFRA)), results
    loser = next(err for code, err in results if code != 0)
    assert loser.count("error:") == 1 and "Traceback" not in loser, loser
    assert "is in use by unsupft pretrain" in loser or "another config (seed" in loser, loser
    winner_seed = seeds[codes.index(0)]
    assert json.loads(store.read_text(store.join(out, "config.json")))["seed"] == winner_seed
    steps = [json.loads(x)["step"] for x in store.read_text(store.join(out, "metrics.jsonl")).splitlines()]
    assert steps == [10, 20, 30, 40]  # one writer's lines, not doubled


def _record(**fields) -> bytes:
    return json.dumps({"purpose": "unsupft test", "token": "t", "pid": 1, "ttl": 2.0, **fields}).encode()


def test_lease_of_a_dead_process_on_this_host_is_taken_at_once(store_uri):
    uri = store.join(store_uri, "out", lease.LEASE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.create_exclusive(uri, _record(host=socket.gethostname(), pid=int(dead.stdout), renewed=time.time()))
    started = time.monotonic()
    held = lease.acquire(uri, "unsupft test", "out")
    assert time.monotonic() - started < 1.5
    assert json.loads(store.read_bytes(uri))["pid"] == os.getpid()
    held.release()
    assert json.loads(store.read_bytes(uri))["released"] is True
    lease.acquire(uri, "unsupft test", "out").release()  # a released lease is free


def test_lease_of_another_host_is_taken_after_its_ttl_unless_renewed(store_uri):
    uri = store.join(store_uri, "out", lease.LEASE)
    renewed = time.time()
    store.create_exclusive(uri, _record(host="elsewhere", renewed=renewed))
    held = lease.acquire(uri, "unsupft test", "out")  # watched it for its 2 s ttl: nobody renewed
    # counted from the record's own renewal time: a slow store write under load shortens the wait
    # after it, not the ttl
    assert 2.0 <= time.time() - renewed < 8
    held.release()

    # A live holder elsewhere renews within its ttl: the newcomer stops with one line.
    other = store.join(store_uri, "other", lease.LEASE)
    version = store.create_exclusive(other, _record(host="elsewhere", renewed=time.time()))
    def renew() -> None:
        time.sleep(0.5)
        store.replace_if(other, _record(host="elsewhere", renewed=time.time()), version)

    threading.Thread(target=renew).start()
    with pytest.raises(lease.LeaseHeld, match="other is in use by unsupft test"):
        lease.acquire(other, "unsupft test", "other")


def test_a_holder_that_lost_its_lease_learns_it_at_the_next_renewal(store_uri, monkeypatch):
    monkeypatch.setenv(lease.TTL_ENV, "60")
    uri = store.join(store_uri, "out", lease.LEASE)
    held = lease.acquire(uri, "unsupft test", "out")
    current = store.read_versioned(uri)
    assert current is not None
    assert store.replace_if(uri, _record(host="elsewhere", renewed=time.time()), current[1])  # a successor took it
    with pytest.raises(InfraError, match="lost the writer lease"):
        held.check()
    held.release()  # releasing a lost lease leaves the successor's record alone
    assert json.loads(store.read_bytes(uri))["host"] == "elsewhere"


def test_two_controllers_started_together_exactly_one_runs(tmp_path):
    # The issue saw both run the whole pipeline in 2 of 10 trials (run.json was created without its
    # controller, written later). The run's lease is taken in one conditional write.
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "UNSUPFT_STAGE_PROGRAM": f"{sys.executable} -m tests.ctl_fake_stages"}
    for trial in range(10):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        f = _pipeline(root)
        procs = [subprocess.Popen([sys.executable, "-m", "unsupft.ctl", "run", str(f)], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, EXIT_INFRA], (trial, results)
        loser = next(err for code, err in results if code != 0)
        assert loser.count("error:") == 1 and "run t is in use by unsupft-ctl" in loser, loser
        for stage_name in ("a", "b", "c"):
            runs = (root / "store/runs/t" / stage_name / "runs.txt").read_text().splitlines()
            assert len(runs) == 1, (trial, stage_name, runs)
