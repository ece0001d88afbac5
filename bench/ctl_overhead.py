"""Controller overhead: time from `unsupft-ctl run` to the first stage's process start, and the wall
time of a fully cached re-run of a pipeline that already finished.

    PYTHONPATH=. python bench/ctl_overhead.py [--pipeline jobs/demo.yaml]

The first number uses a one-stage pipeline in a temporary store; the second re-runs `--pipeline`
(run it once before, e.g. `make demo`). Both spawn `python -m unsupft.ctl` as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def _ctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unsupft.ctl", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@click.command()
@click.option("--pipeline", default="jobs/demo.yaml", show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(pipeline: str, repeats: int) -> None:
    starts = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "one.yaml"
            spec.write_text(f"name: one\nstore: file://{tmp}/store\nstages:\n  a: {{kind: pretrain, sleep: 0}}\n")
            t0 = time.time()
            res = _ctl("run", str(spec), env={"UNSUPFT_STAGE_PROGRAM": f"{sys.executable} -m tests.ctl_fake_stages"})
            assert res.returncode == 0, res.stdout + res.stderr
            started = json.loads((Path(tmp) / "store/runs/one/run.json").read_text())["stages"]["a"]["started"]
            starts.append(started - t0)
    cached = []
    for i in range(repeats):
        t0 = time.time()
        res = _ctl("run", pipeline)
        cached.append(time.time() - t0)
        n = sum(1 for line in res.stdout.splitlines() if line.startswith("[") and line.rstrip().endswith("cached"))
        assert res.returncode == 0 and n > 0, f"run {pipeline} once first:\n{res.stdout}{res.stderr}"
    click.echo(f"run -> first stage process started: median {sorted(starts)[len(starts) // 2]:.2f} s ({', '.join(f'{s:.2f}' for s in starts)})")
    click.echo(f"cached re-run of {pipeline} ({n} stages cached): median {sorted(cached)[len(cached) // 2]:.2f} s ({', '.join(f'{s:.2f}' for s in cached)})")


if __name__ == "__main__":
    main()
