"""Does `unsupft adapt` with source replay + CutMix beat naive unsupervised finetuning?

Source: sklearn digits 0-4; target: digits 5-9 (class-disjoint), a small unlabeled target train
split. One MoCo pretrain on the source, then per seed two `unsupft adapt` runs on the target:
`--replay-fraction 0.1 --mix cutmix` (the method) and `--replay-fraction 0 --mix none` (naive).
Score: 5-shot 1-NN accuracy (cosine) on the target test split, mean over 5 draws of the labeled
references, the same metric as tests/test_pretrain_quality.py.

    PYTHONPATH=. python bench/adapt_study.py --work /tmp/adapt_study [--seeds 0 1 2] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from unsupft.data import load_arrays
from unsupft.data.encode import Encoding, encode_array
from unsupft.data.shards import Sample, write_dataset
from unsupft.preprocess import to_input
from unsupft.models import load_backbone

COMMON = ["--batch-size", "64", "--queue-size", "512", "--key-momentum", "0.99", "--augment", "crop,jitter",
          "--workers", "0", "--checkpoint-every", "0"]


def unsupft(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], check=True, env=env, capture_output=True)


def few_shot_knn(backbone: torch.nn.Module, train, test, shots: int = 5, trials: int = 5) -> float:
    """Mean 1-NN accuracy (cosine) on `test` with `shots` random labeled references per class."""
    backbone.eval()
    with torch.no_grad():
        ref, query = (F.normalize(backbone(to_input(s.images)), dim=1) for s in (train, test))
    accs = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        picks = torch.cat([torch.nonzero(train.labels == c)[:, 0][
            torch.randperm(int((train.labels == c).sum()), generator=g)[:shots]] for c in range(len(train.classes))])
        accs.append((train.labels[picks][(query @ ref[picks].T).argmax(1)] == test.labels).float().mean().item())
    return sum(accs) / trials


def knn_of(model_uri: str, train, test) -> float:
    return few_shot_knn(load_backbone(model_uri)[0], train, test)


def write_subset(src: Path, out: Path, count: int) -> None:
    """A seeded random `count` images of the data set at `src` (the test split stays whole)."""
    full = load_arrays(str(src))
    keep = torch.randperm(len(full.keys), generator=torch.Generator().manual_seed(0))[:count].tolist()
    samples = (Sample(full.keys[i], *encode_array(full.images[i, 0].numpy(), Encoding()), None) for i in keep)
    write_dataset(str(out), samples, classes=[], labeled=False, channels=1, image_size=tuple(full.images.shape[-2:]),
                  source=f"{src} subset {count}", shard_size=10000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/adapt_study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--target-limit", type=int, default=None, help="Keep only this many target train images.")
    args = ap.parse_args()
    work = Path(args.work)
    src, tgt = work / "src", work / "tgt"
    if not (src / "train" / "dataset.json").exists():
        unsupft("ingest", "sklearn:digits", src, "--classes", "0,1,2,3,4", "--split", "0.3")
        unsupft("ingest", "sklearn:digits", tgt, "--classes", "5,6,7,8,9", "--split", "0.3")
    target_train = tgt / "train"
    if args.target_limit:  # the small-target regime replay is meant for
        target_train = work / f"tgt-{args.target_limit}"
        if not (target_train / "dataset.json").exists():
            write_subset(tgt / "train", target_train, args.target_limit)
    unsupft("pretrain", "--data", src / "train", "--out", work / "pre", "--steps", args.pretrain_steps,
            "--lr", "0.06", *COMMON)
    train, test = load_arrays(str(tgt / "train")), load_arrays(str(tgt / "test"))
    results: dict[str, list[float]] = {"pretrained (no adapt)": [knn_of(str(work / "pre"), train, test)]}
    settings = {"replay 0.1 + cutmix": ["--replay-source", src / "train", "--replay-fraction", "0.1", "--mix", "cutmix"],
                "naive": ["--replay-fraction", "0", "--mix", "none"]}
    for seed in args.seeds:
        for name, extra in settings.items():
            out = work / f"{name.split()[0]}-{args.target_limit or 'all'}-{args.steps}-{seed}"
            unsupft("adapt", "--init", work / "pre", "--target", target_train, *extra, "--out", out,
                    "--steps", args.steps, "--seed", seed, "--lr", "0.03", *COMMON)
            results.setdefault(name, []).append(knn_of(str(out), train, test))
            print(name, seed, round(results[name][-1], 4), flush=True)
    summary = {name: {"mean": round(statistics.mean(v), 4), "std": round(statistics.pstdev(v), 4),
                      "runs": [round(x, 4) for x in v]} for name, v in results.items()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
