"""COIN and Bi-tuning against CE at 1, 2 and 4 labels per class, 3 seeds, on sklearn digits.

The backbone is pretrained by `unsupft pretrain` (MoCo v2, tiny ResNet) on the digits train split
unless `--init` names an existing model; every method then finetunes a fresh copy of it on the
same K-per-class draw for a given seed and is scored on the test split (top-1).

    PYTHONPATH=. python bench/transfer_study.py --work /tmp/study
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from unsupft.data import load_arrays
from unsupft.eval.metrics import top1_accuracy
from unsupft.models import load_backbone
from unsupft.eval.fewshot import draw_shots
from unsupft.train.transfer import METHODS, Coin, FinetuneConfig, finetune, predict


class CoinOneSchedule(Coin):
    """COIN as it was before its CE phase restarted the cosine schedule (the baseline row)."""

    def restarts(self) -> tuple[int, ...]:
        return ()


METHODS["coin-one-schedule"] = CoinOneSchedule


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "unsupft", *args], check=True, env={**os.environ})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/unsupft-transfer-study")
    parser.add_argument("--init", default=None, help="a pretrained model (default: pretrain one here)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--shots", default="1,2,4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--methods", default="ce,coin,bituning", help="also: coin-one-schedule (COIN before the restart)")
    parser.add_argument("--coin-alpha", type=float, default=0.7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = os.path.join(args.work, "digits")
    if not os.path.exists(os.path.join(data, "test", "dataset.json")):
        cli("ingest", "sklearn:digits", data, "--split", "0.3", "--seed", "0")
    init = args.init or os.path.join(args.work, "pretrained")
    if args.init is None and not os.path.exists(os.path.join(init, "_DONE.json")):
        cli("pretrain", "--data", os.path.join(data, "train"), "--out", init, "--steps", str(args.pretrain_steps),
            "--batch-size", "128", "--queue-size", "1024")
    train, test = load_arrays(os.path.join(data, "train")), load_arrays(os.path.join(data, "test"))
    rows = []
    for k in (int(s) for s in args.shots.split(",")):
        for seed in range(args.seeds):
            idx = draw_shots(train.labels.numpy(), k, seed, train.classes)
            for method in args.methods.split(","):
                backbone, meta = load_backbone(init)
                start = time.perf_counter()
                model = finetune(backbone, meta, train.images[idx], train.labels[idx], len(train.classes),
                                 FinetuneConfig(method=method, epochs=args.epochs, seed=seed,
                                                coin_alpha=args.coin_alpha))
                acc = top1_accuracy(predict(model, test.images).numpy(), test.labels.numpy())
                row = {"shots": k, "seed": seed, "method": method, "top1": round(acc, 4),
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| K | " + " | ".join(args.methods.split(",")) + " |")
    for k in sorted({r["shots"] for r in rows}):
        cells = []
        for method in args.methods.split(","):
            accs = [r["top1"] for r in rows if r["shots"] == k and r["method"] == method]
            cells.append(f"{np.mean(accs):.3f} ± {np.std(accs):.3f}")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
