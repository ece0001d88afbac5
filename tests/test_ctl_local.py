"""The local backend end to end, with real processes: run, cache, resume after a killed
controller, retry, cancel without leftovers, one run id taken once, store checked first.

Stages are `tests.ctl_fake_stages` (real processes writing the real `_DONE.json`) until the
stage commands of the other issues are on this branch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "UNSUPFT_STAGE_PROGRAM": f"{sys.executable} -m tests.ctl_fake_stages", **extra}


def _pipeline(tmp_path: Path, sleep_b: float = 0.1, extra_b: str = "") -> Path:
    f = tmp_path / "p.yaml"
    f.write_text(f"""\
name: t
store: file://{tmp_path}/store
stages:
  a: {{kind: pretrain, arch: tiny, sleep: 0.1}}
  b: {{kind: adapt, init: a, sleep: {sleep_b}{extra_b}}}
  c: {{kind: evaluate, model: {{b: b}}}}
""")
    return f


def _ctl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsupft.ctl", *args], env=_env(), capture_output=True, text=True,
                          cwd=ROOT, timeout=180, **kw)


def _events(stdout: str, what: str) -> int:
    return sum(1 for line in stdout.splitlines() if line.startswith("[") and line.split(None, 2)[-1].startswith(what))


def _runs(tmp_path: Path, stage: str) -> int:
    f = tmp_path / "store/runs/t" / stage / "runs.txt"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "store/runs/t/run.json").read_text())


def test_run_then_cached_rerun_then_changed_parameter(tmp_path):
    f = _pipeline(tmp_path)
    res = _ctl("run", str(f))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "STAGE" in res.stdout and res.stdout.count("succeeded") >= 6  # events + table
    assert [_runs(tmp_path, s) for s in "abc"] == [1, 1, 1]
    assert _state(tmp_path)["stages"]["c"]["command"][:3] == ["evaluate", "--model", f"b={tmp_path}/store/runs/t/b"]

    again = _ctl("run", str(f))
    assert again.returncode == 0 and _events(again.stdout, "cached") == 3
    assert [_runs(tmp_path, s) for s in "abc"] == [1, 1, 1]

    # A changed parameter re-runs that stage and everything downstream, not upstream.
    f.write_text(f.read_text().replace("sleep: 0.1}\n  c", "sleep: 0.2}\n  c"))
    third = _ctl("run", str(f))
    assert third.returncode == 0, third.stdout
    assert [_runs(tmp_path, s) for s in "abc"] == [1, 1, 1]  # b and c outputs were reset, then ran once
    assert _state(tmp_path)["stages"]["b"]["command"][-3:-2] == ["0.2"] or "0.2" in _state(tmp_path)["stages"]["b"]["command"]
    assert _events(third.stdout, "cached") == 1


def test_failed_attempt_is_retried(tmp_path):
    f = _pipeline(tmp_path, extra_b=", fail_once: true")
    res = _ctl("run", str(f))
    assert res.returncode == 0, res.stdout
    assert "retrying" in res.stdout
    assert _state(tmp_path)["stages"]["b"]["attempts"] == 2
    assert _runs(tmp_path, "b") == 2 and _runs(tmp_path, "c") == 1
    assert "exit" in (tmp_path / "store/runs/t/_logs/b.1.log").read_text() or (tmp_path / "store/runs/t/_logs/b.1.log").exists()


def _wait_for(cond, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached")


def _stage_state(tmp_path, stage):
    try:
        return _state(tmp_path)["stages"][stage]["state"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_killed_controller_is_picked_up_without_redoing_stages(tmp_path):
    f = _pipeline(tmp_path, sleep_b=3.0)
    ctl = subprocess.Popen([sys.executable, "-m", "unsupft.ctl", "run", str(f)], env=_env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: _stage_state(tmp_path, "b") == "running")
    ctl.kill()  # SIGKILL: no chance to clean up; stage b keeps running in its own group
    ctl.wait()
    res = _ctl("run", str(f))
    assert res.returncode == 0, res.stdout + res.stderr
    assert _events(res.stdout, "cached") == 1 and "adopted" in res.stdout
    assert [_runs(tmp_path, s) for s in "abc"] == [1, 1, 1]


def test_cancel_leaves_no_process_behind(tmp_path):
    f = _pipeline(tmp_path, sleep_b=60.0)
    ctl = subprocess.Popen([sys.executable, "-m", "unsupft.ctl", "run", str(f)], env=_env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _stage_state(tmp_path, "b") == "running" and _runs(tmp_path, "b") == 1)
    pid = _state(tmp_path)["stages"]["b"]["pid"]
    res = subprocess.run(
        [sys.executable, "-m", "unsupft.ctl", "--store", f"file://{tmp_path}/store", "cancel", "t"],
        env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out, _ = ctl.communicate(timeout=60)
    assert ctl.returncode == 1
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the stage and the sleeping child it started are gone
    states = {n: r["state"] for n, r in _state(tmp_path)["stages"].items()}
    assert states == {"a": "succeeded", "b": "cancelled", "c": "cancelled"}


def test_submit_twice_is_refused_and_status_reads_the_store(tmp_path):
    f = _pipeline(tmp_path)
    first = _ctl("submit", str(f), "--wait")
    assert first.returncode == 0, first.stdout + first.stderr
    second = _ctl("submit", str(f))
    assert second.returncode == 2 and "already exists" in second.stderr
    status = _ctl("--store", f"file://{tmp_path}/store", "status", "t")
    assert status.returncode == 0 and status.stdout.count("succeeded") == 3
    logs = _ctl("--store", f"file://{tmp_path}/store", "logs", "t", "b")
    assert "ctl_fake_stages adapt --init" in logs.stdout
    fetched = _ctl("--store", f"file://{tmp_path}/store", "fetch", "t", "b", "--to", str(tmp_path / "got"))
    assert fetched.returncode == 0 and (tmp_path / "got/t/b/_DONE.json").exists()


def test_unreachable_store_and_missing_data_fail_before_any_stage(tmp_path):
    f = _pipeline(tmp_path)
    f.write_text(f.read_text().replace(f"file://{tmp_path}/store", "s3://nobucket/x"))
    res = subprocess.run([sys.executable, "-m", "unsupft.ctl", "run", str(f)], capture_output=True, text=True, cwd=ROOT,
                         env=_env(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y",
                                  AWS_MAX_ATTEMPTS="1", UNSUPFT_STORE_RETRY_SECONDS="1"), timeout=120)
    # An unreachable store is an infrastructure failure (exit 69, retry later), not bad input.
    assert res.returncode == 69 and res.stderr.startswith("error: ") and "s3://nobucket" in res.stderr
    assert "unreachable" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    g = _pipeline(tmp_path)
    g.write_text(g.read_text().replace("stages:", f"datasets: {{d: file://{tmp_path}/nodata}}\nstages:"))
    res = _ctl("run", str(g))
    assert res.returncode == 2 and "datasets.d" in res.stderr and "no dataset.json" in res.stderr
    assert not (tmp_path / "store/runs/t").exists()


def test_stages_share_the_cores_instead_of_fighting_over_them(monkeypatch):
    from unsupft.ctl.local import default_parallel, stage_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_parallel() == 1 and stage_env(1)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_parallel() == 4 and stage_env(4)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert stage_env(4)["OMP_NUM_THREADS"] == "3"


def test_results_table_lists_each_model_with_its_headline_numbers():
    from unsupft.ctl.cli import _results_table

    report = {"models": {
        "adapt": {"fewshot": {"1": {"top1_mean": 0.5}, "4": {"top1_mean": 0.75}}, "retrieval_top5": 0.6},
        "naive": {"fewshot": {"4": {"top1_mean": 0.7}}, "retrieval_top5": 0.55, "linear_top1": 0.9},
        "label": {"classifier": {"top1": 0.8}, "fewshot": {"4": {"top1_mean": 0.72}}, "cluster_bcubed_f": 0.4},
    }}
    lines = _results_table(report).splitlines()
    assert lines[0].split() == ["MODEL", "OWN", "TOP1", "1-SHOT", "TOP1", "4-SHOT", "TOP1", "RETRIEVAL_TOP5",
                                "CLUSTER_BCUBED_F", "LINEAR_TOP1"]
    assert lines[1].split() == ["adapt", "-", "0.500", "0.750", "0.600", "-", "-"]
    assert lines[2].split() == ["naive", "-", "-", "0.700", "0.550", "-", "0.900"]
    assert lines[3].split() == ["label", "0.800", "-", "0.720", "-", "0.400", "-"]


def test_stages_see_only_what_the_pipeline_says(monkeypatch):
    """Option variables and the checkpoint trust in the controller's shell would change stages
    behind their cache keys: they stay out; the trust comes from the stage's parameters only."""
    from unsupft.ctl import spec
    from unsupft.ctl.command import check_options, stage_args
    from unsupft.ctl.local import stage_env

    monkeypatch.setenv("UNSUPFT_TRANSFER_EPOCHS", "99")
    monkeypatch.setenv("UNSUPFT_BN_ADAPT_BATCH_SIZE", "7")
    monkeypatch.setenv("UNSUPFT_TRUST_CHECKPOINTS", "1")
    monkeypatch.setenv("UNSUPFT_STAGE_PROGRAM_NOTE", "kept")
    env = stage_env(1)
    assert not {"UNSUPFT_TRANSFER_EPOCHS", "UNSUPFT_BN_ADAPT_BATCH_SIZE", "UNSUPFT_TRUST_CHECKPOINTS"} & set(env)
    assert env["UNSUPFT_STAGE_PROGRAM_NOTE"] == "kept"

    text = ("name: t\nstore: file:///s\ndatasets: {d: file:///d}\n"
            "stages:\n  ft: {kind: transfer, init: /ckpt/solo.ckpt, train: d, trust_checkpoint: true}\n")
    pipeline = spec.parse(text, "p.yaml")
    check_options(pipeline, "p.yaml")
    assert "--trust-checkpoint" in stage_args(pipeline.stages["ft"], "/s/runs/t")


def test_bad_input_is_not_retried(tmp_path):
    """Exit 2 (bad input) fails the same way again: one attempt, as on the cluster (docs/cluster.md, `retries`)."""
    f = _pipeline(tmp_path)
    env = {**_env(), "UNSUPFT_STAGE_PROGRAM": "sh -c 'exit 2' stage"}
    res = subprocess.run([sys.executable, "-m", "unsupft.ctl", "run", str(f)], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "retrying" not in res.stdout, res.stdout
    record = _state(tmp_path)["stages"]["a"]
    assert record["state"] == "failed" and record["attempts"] == 1 and record["exit_code"] == 2
