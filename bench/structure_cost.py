"""What the restructuring (issue 15) costs or saves, side by side with a checkout of the previous
version, in one run: `unsupft-ctl validate` on every pipeline in jobs/ (wall time, peak RSS,
whether torch/numpy were imported), the in-cluster driver's peak memory (bench/driver_memory.py of
each checkout), and the line count of the package.

    git archive main | tar -x -C /tmp/base
    python bench/structure_cost.py --baseline /tmp/base

Both checkouts validate the pipelines of this one's jobs/ (the same files). Each checkout runs with its own code first on PYTHONPATH (the same interpreter and packages).
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


def validate_once(code: Path, pipeline: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one `unsupft-ctl validate` with the code of `code`."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "unsupft.ctl", "validate",
                          str(pipeline)], env=env_for(code), cwd=code, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    wall, rss_kib = out.stderr.strip().splitlines()[-1].split()
    return float(wall), int(rss_kib) / 1024


def imported_by_validate(code: Path, pipeline: Path) -> list[str]:
    probe = subprocess.run([sys.executable, "-c", IMPORTED, str(pipeline)], env=env_for(code), cwd=code,
                           capture_output=True, text=True)
    return json.loads(probe.stdout.strip().splitlines()[-1].replace("'", '"'))


def validate_cost(codes: dict[str, Path]) -> dict[str, dict[str, object]]:
    """Median seconds, peak RSS and imports of `unsupft-ctl validate` over the pipelines in jobs/,
    the checkouts taking turns (so a change in the machine's load hits both alike)."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in codes}
    imported: dict[str, set[str]] = {name: set() for name in codes}
    for pipeline in sorted((ROOT / "jobs").glob("*.yaml")):
        for _ in range(REPEATS):
            for name, code in codes.items():
                runs[name].append(validate_once(code, pipeline))
        for name, code in codes.items():
            imported[name] |= set(imported_by_validate(code, pipeline))
    return {name: {"median_s": round(statistics.median(s for s, _ in runs[name]), 2),
                   "max_rss_mib": round(max(m for _, m in runs[name]), 1), "imports": sorted(imported[name]),
                   "runs": len(runs[name])} for name in codes}


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
    codes = {"before": args.baseline.resolve(), "after": ROOT}
    validate = validate_cost(codes)
    report = {name: {"validate": validate[name], "driver_max_rss_mib": driver_cost(code),
                     "unsupft_lines": package_lines(code)} for name, code in codes.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
