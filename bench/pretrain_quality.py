"""Does a short MoCo pretrain give better target features than a random network? (kNN on the target)

Class-disjoint source and target (made with `unsupft ingest --classes`). Per seed:
- `random`: a seeded, randomly initialised backbone of the same architecture;
- `pretrain`: `unsupft pretrain` on the source only (the target's classes are never seen);
- `pretrain + bn-adapt`: that model with its BatchNorm statistics re-estimated on the unlabeled
  target train split (`unsupft bn-adapt`, HPT's base transfer);
- `TUP`: `unsupft pretrain` on the source with the unlabeled target train split re-balanced in
  (`--target --target-ratio 0.2`).
Score: 5-shot 1-NN accuracy (cosine) on the target test split, mean of 5 draws of the references
(`bench.adapt_study.few_shot_knn`, the metric of tests/test_pretrain_quality.py). Prints one JSON
line per model and seed, then a Markdown table of mean and std over the seeds.

    PYTHONPATH=. python bench/pretrain_quality.py --source S --target T/train --test T/test --work DIR \
        [--seeds 0 1 2] [--steps 600] [--batch-size 128] [--lr 0.06] [--arch tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.adapt_study import few_shot_knn, knn_of, unsupft
from unsupft.data import load_arrays
from unsupft.models import build_backbone

MODELS = ("random", "pretrain", "pretrain + bn-adapt", "TUP")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True)
    ap.add_argument("--target", required=True, help="target train split (unlabeled for pretraining; kNN references)")
    ap.add_argument("--test", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.06)
    ap.add_argument("--queue-size", type=int, default=4096)
    ap.add_argument("--augment", default=None, help="default: the stage's default list")
    ap.add_argument("--arch", default="tiny")
    args = ap.parse_args()
    work = Path(args.work)
    train, test = load_arrays(args.target), load_arrays(args.test)
    common = ["--arch", args.arch, "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
              "--queue-size", args.queue_size, "--key-momentum", 0.99, "--checkpoint-every", 0,
              *(["--augment", args.augment] if args.augment else [])]
    scores: dict[str, list[float]] = {m: [] for m in MODELS}
    for seed in args.seeds:
        base, tup, adapted = (work / f"{name}-{seed}" for name in ("pretrain", "tup", "bn-adapt"))
        unsupft("pretrain", "--data", args.source, "--out", base, "--seed", seed, *common)
        unsupft("bn-adapt", "--init", base, "--data", args.target, "--out", adapted)
        unsupft("pretrain", "--data", args.source, "--target", args.target, "--target-ratio", 0.2, "--out", tup,
                "--seed", seed, *common)
        torch.manual_seed(seed)
        row = {"random": few_shot_knn(build_backbone(args.arch, train.images.shape[1]), train, test),
               "pretrain": knn_of(str(base), train, test), "pretrain + bn-adapt": knn_of(str(adapted), train, test),
               "TUP": knn_of(str(tup), train, test)}
        for model, acc in row.items():
            scores[model].append(acc)
            print(json.dumps({"seed": seed, "model": model, "knn": round(acc, 4)}), flush=True)
    print("\n| model | mean | std | runs |\n|---|---|---|---|")
    for model, accs in scores.items():
        std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        print(f"| {model} | {statistics.mean(accs):.3f} | {std:.3f} | {', '.join(f'{a:.3f}' for a in accs)} |")


if __name__ == "__main__":
    main()
