"""A real `unsupft pretrain` (DataLoader worker included) at several OpenMP thread counts.

`unsupft-ctl run` gives each stage `OMP_NUM_THREADS`; this measures what that choice costs. Each
variant is the same command (same data, seed and steps) in its own process; the variants
alternate over `--rounds`, so load from other processes hits them alike; best round reported.

    PYTHONPATH=. python bench/stage_threads.py --data data/study/fashion [--threads 1,2] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_pretrain(data: str, threads: int, steps: int, batch: int, out: Path) -> dict[str, float]:
    """Wall seconds and the images/s of the run's second half (after start-up and warm-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "unsupft", "pretrain", "--data", data, "--arch", "tiny", "--image-size", "28",
               "--batch-size", str(batch), "--steps", str(steps), "--queue-size", "4096",
               "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "samples_per_s" in line]
    late = logged[len(logged) // 2:]
    return {"wall_s": wall, "images_per_s": sum(line["samples_per_s"] for line in late) / len(late)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    variants = [int(t) for t in args.threads.split(",")]
    best: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for threads in variants:
                result = run_pretrain(args.data, threads, args.steps, args.batch, Path(work) / f"r{r}-t{threads}")
                if threads not in best or result["images_per_s"] > best[threads]["images_per_s"]:
                    best[threads] = result
    print(json.dumps({"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "workers": (os.cpu_count() or 2) // 2,
                      "results": {str(t): best[t] for t in variants}}))
    first = best[variants[0]]["images_per_s"]
    for threads in variants:
        print(f"OMP_NUM_THREADS={threads}: {best[threads]['images_per_s']:.1f} images/s "
              f"({best[threads]['images_per_s'] / first:.2f}x), {best[threads]['wall_s']:.1f} s wall")


if __name__ == "__main__":
    main()
