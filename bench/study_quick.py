"""jobs/study.yaml cut to what a loaded 2-core machine can run in about an hour, then run.

The same stages, settings and claims, but fewer seeds, every training length divided, and only
the stages named by --keep (with the evaluate entries, reports and claims that refer to what was
dropped removed). The derived pipeline is printed (so what ran is on record) and run with the same
run id, so stages it shares with an earlier run are cached. Wall time and load are printed.

    PYTHONPATH=. python bench/study_quick.py --seeds 0,1 --scale 3 \\
        --keep base,tup,naive,replay,mixing,uft,eval-uft,study
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

LENGTHS = ("steps", "epochs")  # divided by --scale (at least 1); matrix axes over steps too


def derive(doc: dict, seeds: list[int], scale: int, keep: set[str], batch: int, shots: list[int]) -> dict:
    stages = {name: body for name, body in doc["stages"].items() if name in keep}
    steps_values = {s for b in stages.values() for s in (b.get("matrix") or {}).get("steps", [])}
    for body in stages.values():
        if body["kind"] in ("pretrain", "adapt"):
            body["batch_size"] = batch
        if body["kind"] == "evaluate" and "shots" in body:
            body["shots"] = shots
        for key in LENGTHS:
            if isinstance(body.get(key), int):
                body[key] = max(1, body[key] // scale)
        matrix = body.get("matrix") or {}
        if "seed" in matrix:
            matrix["seed"] = seeds
        if "steps" in matrix:
            matrix["steps"] = [max(1, s // scale) for s in matrix["steps"]]
        for key in ("model", "label", "report"):
            if isinstance(body.get(key), dict):
                body[key] = {k: v for k, v in body[key].items() if v in stages or v in doc.get("datasets", {})}
        if not body.get("label", True):
            del body["label"]
    study = next((b for b in stages.values() if b["kind"] == "study"), None)
    if study is not None:
        models = {m for b in stages.values() if b["kind"] == "evaluate" for m in (*b.get("model", {}), *b.get("label", {}))}
        def kept(spec: str) -> bool:
            names = re.findall(r"[:,]\s*([-a-z0-9]+?)(?:-\d+)?\s*(?=vs|,|@)|vs\s+([-a-z0-9]+?)(?:-\d+)?\s*@", spec)
            return spec.split(":")[0].strip() in study["report"] and all(n in models for pair in names for n in pair if n)
        def rescale(spec: str) -> str:  # model names and words that carry a number of steps
            return re.sub(r"(?<=[-\s])(\d+)\b",
                          lambda m: str(max(1, int(m[1]) // scale)) if int(m[1]) in steps_values else m[1], spec)
        study["claim"] = {k: rescale(v) for k, v in study["claim"].items() if kept(v)
                          and not any(f"fewshot_{k_}_" in v for k_ in (1, 2, 4, 8) if k_ not in shots)}
        study["curve"] = {k: v for k, v in (study.get("curve") or {}).items() if kept(v)}
        if not study["curve"]:
            del study["curve"]
    return {**doc, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", default="jobs/study.yaml")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--scale", type=int, default=3, help="divide every steps/epochs value by this")
    parser.add_argument("--batch", type=int, default=64, help="batch size of pretrain and adapt")
    parser.add_argument("--shots", default="1,4", help="evaluate's few-shot K")
    parser.add_argument("--keep", required=True, help="comma list of the stages (as written) to keep")
    args = parser.parse_args()
    doc = yaml.safe_load(Path(args.pipeline).read_text())
    derived = derive(doc, [int(s) for s in args.seeds.split(",")], args.scale, set(args.keep.split(",")), args.batch,
                     [int(k) for k in args.shots.split(",")])
    text = yaml.safe_dump(derived, sort_keys=False, width=200)
    print(text, flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    ctl = str(Path(sys.executable).with_name("unsupft-ctl"))
    subprocess.run([ctl, "validate", f.name], check=True)
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    start = time.time()
    code = subprocess.run([ctl, "run", f.name]).returncode
    print(f"wall: {time.time() - start:.0f} s; exit {code}; load after: {Path('/proc/loadavg').read_text().strip()}")
    Path(f.name).unlink()
    sys.exit(code)


if __name__ == "__main__":
    main()
