"""The bad-input corpus for pipeline files and the controller (issue 24, beside tests/test_bad_inputs.py).

Each refused case ends with exit code 2, exactly one `error:` line naming `file:line` and the field,
no traceback, and nothing written (the store of the pipeline is never created). Refused here:
unsupft's own variables in `resources.env` (case 4: the checkpoint trust and the stage options would
reach every pod behind the cache keys), YAML 1.1 numbers a person reads otherwise (case 11: `010` is
octal 8, `1:30` is 90), more stages than a pipeline holds and resource values that are no
Kubernetes quantity (case 13). Accepted and run (case 13): a data set given as a `.tar`, a folder of
foreign shards or a brace pattern. Stopped (case 14): a controller sent SIGTERM stops its stage,
records it as interrupted and exits 143; the rerun completes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_bad_inputs import PIPE, Case, _tar, _tree
from unsupft.ctl import kube, spec
from unsupft.ctl.command import check_options
from unsupft.ctl.cli import main as ctl_main

ROOT = Path(__file__).resolve().parents[1]
DATA = "/nonexistent/digits"  # validate reads no data; `run` refuses before its store is touched
RESOURCES = "resources:\n  defaults:\n    gpus: 0\n{lines}"  # appended to PIPE: the fields below are on line 8


def pipe(extra: str = "steps: 2", resources: str = "") -> dict[str, str]:
    """A one-stage pipeline (`a`, a pretrain, on line 4) with `extra` parameters and resource lines."""
    text = PIPE.replace("{extra}", extra).replace("{data}", DATA)
    return {"p.yaml": text + (RESOURCES.format(lines=resources) if resources else "")}


def parse(files: dict[str, str]) -> spec.Pipeline:
    return spec.parse(files["p.yaml"].replace("{t}", "/s"), "p.yaml")


def yaml11(option: str, written: str, needle: str) -> Case:
    return Case(f"yaml11-{option}-{written}", ["validate", "{t}/p.yaml"], files=pipe(f"{option}: {written}"),
                needle=f"p.yaml:4: stages.a.{option}: {needle}", ctl=True)


_STAGES = "".join(f"  s{i}: {{kind: pretrain, data: [{DATA}]}}\n" for i in range(1001))

CASES = [
    # -- case 4: unsupft's own variables in resources.env, for every command that reads a pipeline ----
    *[Case(f"env-trust-{command}", [command, "{t}/p.yaml"], ctl=True,
           files=pipe(resources="    env:\n      NCCL_DEBUG: INFO\n      UNSUPFT_TRUST_CHECKPOINTS: '1'\n"),
           needle="p.yaml:10: resources.defaults.env.UNSUPFT_TRUST_CHECKPOINTS: a pipeline cannot set unsupft's own "
                  "variables (UNSUPFT_*): it would trust the checkpoints of every stage; ask for it per stage with "
                  "trust_checkpoint: true")
      for command in ("validate", "run", "render", "submit")],
    Case("env-stage-option-per-stage", ["run", "{t}/p.yaml"], ctl=True,
         files=pipe(resources="  a:\n    env: {UNSUPFT_PRETRAIN_BATCH_SIZE: '7'}\n"),
         needle="p.yaml:9: resources.a.env.UNSUPFT_PRETRAIN_BATCH_SIZE: a pipeline cannot set unsupft's own variables "
                "(UNSUPFT_*): it would set --batch-size of pretrain stages behind their cache keys; give batch_size as "
                "a parameter of the stage"),
    Case("env-other-own-variable", ["validate", "{t}/p.yaml"], ctl=True,
         files=pipe(resources="    env: {unsupft_shuffle_window_mb: '64'}\n"),
         needle="p.yaml:8: resources.defaults.env.unsupft_shuffle_window_mb: a pipeline cannot set unsupft's own"),
    # -- case 11: YAML 1.1 numbers read otherwise than written --------------------------------------
    yaml11("seed", "010", "010 is read as octal 8 by YAML 1.1: write 10 without the leading zero (or 8), or quote it"),
    yaml11("seed", "-0_17", "-0_17 is read as octal -15 by YAML 1.1: write -17 without the leading zero"),
    yaml11("steps", "1:30", "1:30 is read as 90 (base 60) by YAML 1.1: write 90, or quote it"),
    yaml11("lr", "0:30.5", "0:30.5 is read as 30.5 (base 60) by YAML 1.1"),
    yaml11("batch_size", "0x10", "0x10 is read as 16 (hexadecimal) by YAML 1.1: write 16, or quote it"),
    yaml11("workers", "0b10", "0b10 is read as 2 (binary) by YAML 1.1: write 2, or quote it"),
    yaml11("steps", "1__0", "1__0 is read as 10 by YAML 1.1: write 10, or quote it"),
    yaml11("augment", "010", "010 is read as octal 8"),  # a string option would get "8"
    Case("yaml11-matrix-value", ["validate", "{t}/p.yaml"], ctl=True, files=pipe("matrix: {seed: [1, 010]}"),
         needle="p.yaml:4: stages.a.matrix.seed[1]: 010 is read as octal 8"),
    Case("yaml11-resource", ["validate", "{t}/p.yaml"], ctl=True, files=pipe(resources="    retries: 0x1\n"),
         needle="p.yaml:8: resources.defaults.retries: 0x1 is read as 1 (hexadecimal)"),
    # -- case 13: the stage limit counts every stage; Kubernetes quantities --------------------------
    Case("stages-1001-plain", ["validate", "{t}/p.yaml"], ctl=True, files={"p.yaml": f"name: p\nstages:\n{_STAGES}"},
         needle="p.yaml:2: stages: 1001 stages; a pipeline holds at most 1000"),
    *[Case(f"quantity-{field}-{value}", ["validate", "{t}/p.yaml"], ctl=True, files=pipe(resources=f"    {field}: {value}\n"),
           needle=f"p.yaml:8: resources.defaults.{field}: {message}")
      for field, value, message in [
          ("cpu", "lots", "'lots' is not a Kubernetes quantity (a number with an optional suffix: cpu 2, 0.5 or 500m; "
                          "memory 512Mi, 4Gi or 4G)"),
          ("memory", "4Gigabytes", "'4Gigabytes' is not a Kubernetes quantity"),
          ("memory", "4 Gi", "'4 Gi' is not a Kubernetes quantity"),
          ("memory", "1K", "'1K' is not a Kubernetes quantity"),  # kilo is k; K only in Ki
          ("memory", "1e3.5", "'1e3.5' is not a Kubernetes quantity"),  # the exponent is an integer
          ("cpu", ".", "'.' is not a Kubernetes quantity"),
          ("cpu", ".inf", "inf is not a Kubernetes quantity"),
          ("cpu", "-1", "out of range: -1 (Kubernetes refuses negative requests)")]],
    # -- case 13: `run` refuses a data set that names nothing, before it writes anything -------------
    Case("run-missing-tar", ["run", "{t}/p.yaml"], ctl=True,
         files={"p.yaml": "name: p\nstore: file://{t}/store\ndatasets: {d: {t}/gone.tar}\nstages:\n  a: {kind: pretrain, data: [d]}\n"},
         needle="datasets.d: {t}/gone.tar: no such shard"),
    Case("run-folder-without-tars", ["run", "{t}/p.yaml"], ctl=True,
         files={"p.yaml": "name: p\nstore: file://{t}/store\ndatasets: {d: {t}/f}\nstages:\n  a: {kind: pretrain, data: [d]}\n",
                "f/readme.txt": "no shards here"},
         needle="datasets.d: {t}/f: not a data set (no dataset.json and no .tar shards)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_pipeline_is_one_line_exit_2_and_writes_nothing(case: Case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case_dir = tmp_path / "case"
    for name, content in case.files.items():
        target = case_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content.replace("{t}", str(case_dir)))
    before = _tree(tmp_path)
    result = CliRunner().invoke(ctl_main, [a.format(t=case_dir) for a in case.args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert case.needle.format(t=case_dir) in errors[0], errors[0]
    assert _tree(tmp_path) == before  # nothing written: no store, no run


def test_plain_numbers_stay_numbers():
    """What YAML and a person read alike is accepted as it was: decimals, `_` between digits, a sign,
    a leading zero YAML 1.1 does not take as octal (08 is a string, which the stage reads as 8), a
    quoted string."""
    pipeline = parse(pipe("steps: 1_000, seed: +5, batch_size: '010', image_size: 08, lr: 1.5e-3"))
    assert {k: pipeline.stages["a"].params[k] for k in ("steps", "seed", "batch_size", "image_size", "lr")} == {
        "steps": 1000, "seed": 5, "batch_size": "010", "image_size": "08", "lr": 0.0015}
    check_options(pipeline, "p.yaml")  # and the stage's own types take them


@pytest.mark.parametrize("value", ["2", "0.5", "500m", "4Gi", "1e9", "1.5G", "+1", "2.", ".5", "100n", "1E"])
def test_kubernetes_quantities_are_accepted(value):
    parse(pipe(resources=f"    cpu: {value}\n    memory: '{value}'\n"))  # cpu may be a YAML number, memory is a string


def test_pods_never_get_unsupft_variables_even_from_a_spec_built_in_code():
    """`validate` refuses them in a file; a `Resources` made in code is filtered where env is rendered."""
    pipeline = parse(pipe())
    smuggled = {"NCCL_DEBUG": "INFO", "UNSUPFT_TRUST_CHECKPOINTS": "1", "UNSUPFT_PRETRAIN_LR": "9", "unsupft_cache": "/x"}
    for nodes in (1, 2):  # a Job, a TrainJob
        stage = dataclasses.replace(pipeline.stages["a"], resources=spec.Resources(env=smuggled, nodes=nodes))
        obj = kube.render(dataclasses.replace(pipeline, stages={"a": stage}), kube.Context("p", "ns"), "img")[-1]
        env = obj["spec"]["trainer"]["env"] if nodes > 1 else obj["spec"]["template"]["spec"]["containers"][0]["env"]
        assert [e["name"] for e in env] == ["PYTHONUNBUFFERED", "NCCL_DEBUG"], obj["kind"]


# -- real controllers (subprocesses), with stage programs that show what a stage got -----------------


def _ctl(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsupft.ctl", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120, **kw)


def _env(program: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "UNSUPFT_STAGE_PROGRAM": program, **extra}


def test_local_stages_get_no_option_variables_nor_trust_from_the_controller(tmp_path):
    """README: "unsupft-ctl does not pass these variables on". The stage program records the
    environment it got; the controller's shell had the trust and stage options set."""
    seen = tmp_path / "env.json"
    program = f"{sys.executable} -c 'import json, os; json.dump(dict(os.environ), open({json.dumps(str(seen))}, \"w\"))'"
    f = tmp_path / "p.yaml"
    f.write_text(f"name: t\nstore: file://{tmp_path}/store\nstages:\n  a: {{kind: transfer, init: /m}}\n"
                 "resources:\n  defaults: {retries: 0, env: {PIPELINE_ONLY: 'for pods'}}\n")
    res = _ctl(["run", str(f)], _env(program, UNSUPFT_TRUST_CHECKPOINTS="1", UNSUPFT_TRANSFER_EPOCHS="99",
                                     UNSUPFT_STORE_RETRY_SECONDS="5"))
    assert res.returncode == 1 and "ended without writing _DONE.json" in res.stdout, res.stdout + res.stderr
    env = json.loads(seen.read_text())
    assert "UNSUPFT_TRUST_CHECKPOINTS" not in env and "UNSUPFT_TRANSFER_EPOCHS" not in env
    assert env["UNSUPFT_STORE_RETRY_SECONDS"] == "5"  # the store's settings for this machine do pass
    assert "PIPELINE_ONLY" not in env  # resources.env is for pods; the local backend ignores it


def test_run_reads_the_data_sets_the_stages_read(tmp_path):
    """A `.tar`, a folder of foreign shards and a brace pattern validate, and `run` runs on them."""
    member = {"k.png": b"png bytes the stage reads", "k.cls": b"0"}
    (tmp_path / "one.tar").write_bytes(_tar(member))
    (tmp_path / "foreign").mkdir()
    for i in range(2):
        (tmp_path / "foreign" / f"part-{i}.tar").write_bytes(_tar(member))
    f = tmp_path / "p.yaml"
    f.write_text(f"name: t\nstore: file://{tmp_path}/store\n"
                 f"datasets: {{one: {tmp_path}/one.tar, foreign: {tmp_path}/foreign, "
                 f"pattern: '{tmp_path}/foreign/part-{{0..1}}.tar'}}\n"
                 "stages:\n  a: {kind: pretrain, data: [one, foreign, pattern], sleep: 0}\n")
    res = _ctl(["run", str(f)], _env(f"{sys.executable} -m tests.ctl_fake_stages"))
    assert res.returncode == 0, res.stdout + res.stderr
    ran = (tmp_path / "store/runs/t/a/runs.txt").read_text()
    assert f"--data {tmp_path}/one.tar --data {tmp_path}/foreign --data {tmp_path}/foreign/part-{{0..1}}.tar" in ran


def test_sigterm_stops_the_stage_records_it_and_the_rerun_completes(tmp_path):
    """SIGTERM to `unsupft-ctl run` (an eviction, `timeout`, systemd): the stage gets SIGTERM (it
    records that it did), the controller records it as interrupted, says so in one line and exits
    143; `status` says interrupted; the rerun runs it again to the end."""
    marks = tmp_path / "marks"
    marks.mkdir()
    # First attempt: trap SIGTERM (as a stage that checkpoints would), block; later ones: the fake stage.
    script = (f'if [ ! -e {marks}/started ]; then trap ": > {marks}/got-term; exit 143" TERM; : > {marks}/started; '
              f'sleep 60 & wait; fi; exec {sys.executable} -m tests.ctl_fake_stages "$@"')
    env = _env(f"sh -c '{script}' stage")
    f = tmp_path / "p.yaml"
    f.write_text(f"name: t\nstore: file://{tmp_path}/store\nstages:\n  a: {{kind: pretrain, arch: tiny, sleep: 0}}\n")
    ctl = subprocess.Popen([sys.executable, "-m", "unsupft.ctl", "run", str(f)], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_json = tmp_path / "store/runs/t/run.json"
    deadline = time.time() + 60
    while not ((marks / "started").exists() and run_json.exists()
               and json.loads(run_json.read_text())["stages"]["a"]["state"] == "running"):
        assert time.time() < deadline and ctl.poll() is None, "the stage never started"
        time.sleep(0.1)
    stage_pid = json.loads(run_json.read_text())["stages"]["a"]["pid"]
    ctl.send_signal(signal.SIGTERM)
    out, err = ctl.communicate(timeout=60)
    assert ctl.returncode == 143, (out, err)
    assert err.splitlines() == ["error: stopped by SIGTERM: interrupted a; run again (or `unsupft-ctl resume t`) "
                                "to continue where it stopped"], err
    assert (marks / "got-term").exists()  # the stage was asked to stop, not killed outright
    with pytest.raises(ProcessLookupError):
        os.killpg(stage_pid, 0)  # nothing of it is left running
    record = json.loads(run_json.read_text())["stages"]["a"]
    assert record["state"] == "interrupted" and record["pid"] is None
    status = _ctl(["--store", f"file://{tmp_path}/store", "status", "t"], env)
    assert "interrupted: the controller got SIGTERM" in status.stdout

    again = _ctl(["run", str(f)], env)
    assert again.returncode == 0, again.stdout + again.stderr
    record = json.loads(run_json.read_text())["stages"]["a"]
    assert record["state"] == "succeeded" and record["attempts"] == 2
