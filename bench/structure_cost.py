"""What the restructuring (issue 15) costs or saves, side by side with a checkout of the previous
version, in one run: `unsupft-ctl validate` on every pipeline in jobs/ (wall time, peak RSS,
whether torch/numpy were imported), the in-cluster driver's peak memory (bench/driver_memory.py of
each checkout), and the line count of the package.

    git archive main | tar -x -C /tmp/base
    python bench/structure_cost.py --baseline /tmp/base

Each checkout runs with its own code first on PYTHONPATH (the same interpreter and packages).
Peak RSS is GNU time's %M of the python process (the small `time` process forks it, so the bench's
own memory is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5
IMPORTED = ("import sys, runpy; sys.argv = ['unsupft-ctl', 'validate', sys.argv[1]]\n"
            "try:\n    runpy.run_module('unsupft.ctl', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n")


def env_for(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code)}


def validate_cost(code: Path) -> dict[str, object]:
    """Median seconds and peak RSS (MiB) of `unsupft-ctl validate` over the pipelines in jobs/."""
    seconds, peaks, imported = [], [], set()
    for pipeline in sorted((code / "jobs").glob("*.yaml")):
        for _ in range(REPEATS):
            out = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "unsupft.ctl", "validate",
                                  str(pipeline)], env=env_for(code), cwd=code, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            wall, rss_kib = out.stderr.strip().splitlines()[-1].split()
            seconds.append(float(wall))
            peaks.append(int(rss_kib) / 1024)
        probe = subprocess.run([sys.executable, "-c", IMPORTED, str(pipeline)], env=env_for(code), cwd=code,
                               capture_output=True, text=True)
        imported |= set(json.loads(probe.stdout.strip().splitlines()[-1].replace("'", '"')))
    return {"median_s": round(statistics.median(seconds), 2), "max_rss_mib": round(max(peaks), 1),
            "imports": sorted(imported), "runs": len(seconds)}


def driver_cost(code: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(code / "bench" / "driver_memory.py")], env=env_for(code), cwd=code,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    return {path: r["max_rss_mib"] for path, r in results.items()}


def package_lines(code: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (code / "unsupft").rglob("*.py"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the previous version")
    args = parser.parse_args()
    report = {}
    for name, code in (("before", args.baseline.resolve()), ("after", ROOT)):
        report[name] = {"validate": validate_cost(code), "driver_max_rss_mib": driver_cost(code),
                        "unsupft_lines": package_lines(code)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
