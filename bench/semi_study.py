"""FixMatch (`unsupft semi`) against CE finetuning (`unsupft transfer`) at the same labels, same init.

sklearn digits split 70/30; a tiny ResNet pretrained by `unsupft pretrain` on the train split (unless
`--init` names one). For each seed the same K-per-class draw (both stages draw with `--shots K --seed s`)
trains: `transfer` (CE), `semi` with the unlabeled loss off (the same recipe and EMA, labels only: what
the unlabeled images add is the difference to it), and `semi` with the whole train split as the
unlabeled set. Every model.pt is scored the same way on the test split (top-1), all in one run.

`--question init` asks the papers' other question (Table 5 of "Unsupervised Finetuning", Table 6 of
the TUP paper): does FixMatch from the unsupervised-finetuned model beat FixMatch from the model it was
finetuned from? Source: digits 0-4, target: digits 5-9 split 70/30 (class-disjoint, as in
bench/adapt_study.py). `unsupft pretrain` on the source, then `unsupft adapt` of that model on the
target train split (source replay 0.1 + CutMix); per seed, `semi` and `transfer` (CE) from each of the
two models with the same K-per-class draw.

    PYTHONPATH=. python bench/semi_study.py --work /tmp/semi-study
    PYTHONPATH=. python bench/semi_study.py --work /tmp/semi-init --question init --steps 50
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
from unsupft.models import load


def cli(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unsupft", *args], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(out: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    model, preprocess = load(out)
    return top1_accuracy(model(preprocess(images)).argmax(1).numpy(), labels.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/unsupft-semi-study")
    parser.add_argument("--init", default=None, help="a pretrained model (default: pretrain one here)")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (CE: epochs of one step)")
    parser.add_argument("--lr-head", default="3.0", help="of every run (transfer's default: 3.0)")
    parser.add_argument("--lr-backbone", default="1e-4", help="of every run (transfer's default: 1e-4)")
    parser.add_argument("--semi", default="", help="extra options of both semi runs, e.g. '--threshold 0.9'")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--question", choices=("unlabeled", "init"), default="unlabeled",
                        help="unlabeled: CE vs semi without and with the unlabeled loss; init: from pretrained vs adapted")
    parser.add_argument("--adapt-steps", type=int, default=60, help="--question init: the adapt run's steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.question == "init":
        init_question(args)
        return
    data = os.path.join(args.work, "digits")
    if not os.path.exists(os.path.join(data, "test", "dataset.json")):
        cli("ingest", "sklearn:digits", data, "--split", "0.3", "--seed", "0")
    train_uri = os.path.join(data, "train")
    init = args.init or os.path.join(args.work, "pretrained")
    if args.init is None and not os.path.exists(os.path.join(init, "_DONE.json")):
        cli("pretrain", "--data", train_uri, "--out", init, "--steps", str(args.pretrain_steps),
            "--batch-size", "128", "--queue-size", "1024")
    test = load_arrays(os.path.join(data, "test"))
    common = ["--init", init, "--train", train_uri, "--shots", str(args.shots), "--lr-head", args.lr_head,
              "--lr-backbone", args.lr_backbone]
    semi = [*common, "--unlabeled", train_uri, "--steps", str(args.steps), "--workers", args.workers, *args.semi.split()]
    runs = {
        "transfer_ce": lambda s, out: cli("transfer", *common, "--epochs", str(args.steps), "--seed", s, "--out", out),
        "semi_labels_only": lambda s, out: cli("semi", *semi, "--unlabeled-weight", "0", "--seed", s, "--out", out),
        "semi_fixmatch": lambda s, out: cli("semi", *semi, "--seed", s, "--out", out),
    }
    report(args, runs, test)


def report(args: argparse.Namespace, runs: dict, test) -> None:
    """Every run per seed (one JSON line each), then mean, std and time per run."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for seed in range(args.seeds):
        for name, run in runs.items():
            out = os.path.join(args.work, f"{name}-{seed}")
            seconds = run(str(seed), out)
            row = {"seed": seed, "top1": accuracy(out, test.images, test.labels), "seconds": seconds}
            done = json.load(open(os.path.join(out, "_DONE.json")))
            if "pseudo_label_rate" in done.get("final_metrics", {}):
                row["pseudo_label_rate"] = done["final_metrics"]["pseudo_label_rate"]
            results[name].append(row)
            print(json.dumps({"run": name, **row}), flush=True)
    summary = {name: {"top1_mean": float(np.mean([r["top1"] for r in rows])),
                      "top1_std": float(np.std([r["top1"] for r in rows])),
                      "seconds_mean": float(np.mean([r["seconds"] for r in rows]))} for name, rows in results.items()}
    print(json.dumps({"question": args.question, "shots": args.shots, "steps": args.steps, "lr_head": args.lr_head,
                      "lr_backbone": args.lr_backbone, "semi": args.semi, "summary": summary}, indent=1))


def init_question(args: argparse.Namespace) -> None:
    """FixMatch and CE from the source-pretrained model and from its target-adapted version."""
    source, target = os.path.join(args.work, "source"), os.path.join(args.work, "target")
    if not os.path.exists(os.path.join(target, "test", "dataset.json")):
        cli("ingest", "sklearn:digits", source, "--classes", "0,1,2,3,4", "--seed", "0", "--unlabeled")
        cli("ingest", "sklearn:digits", target, "--classes", "5,6,7,8,9", "--split", "0.3", "--seed", "0")
    train_uri = os.path.join(target, "train")
    pretrained, adapted = os.path.join(args.work, "pretrained"), os.path.join(args.work, "adapted")
    moco = ["--batch-size", "128", "--queue-size", "1024", "--workers", args.workers]
    if not os.path.exists(os.path.join(pretrained, "_DONE.json")):
        cli("pretrain", "--data", source, "--out", pretrained, "--steps", str(args.pretrain_steps), *moco)
    if not os.path.exists(os.path.join(adapted, "_DONE.json")):
        cli("adapt", "--init", pretrained, "--target", train_uri, "--replay-source", source, "--replay-fraction", "0.1",
            "--mix", "cutmix", "--steps", str(args.adapt_steps), "--out", adapted, *moco)
    test = load_arrays(os.path.join(target, "test"))

    def runs_from(init: str) -> dict:
        common = ["--init", init, "--train", train_uri, "--shots", str(args.shots), "--lr-head", args.lr_head,
                  "--lr-backbone", args.lr_backbone]
        return {
            "transfer_ce": lambda s, out: cli("transfer", *common, "--epochs", str(args.steps), "--seed", s, "--out", out),
            "semi_fixmatch": lambda s, out: cli("semi", *common, "--unlabeled", train_uri, "--steps", str(args.steps),
                                                "--workers", args.workers, *args.semi.split(), "--seed", s, "--out", out),
        }

    runs = {f"{name}_from_{which}": run for which, init in (("pretrained", pretrained), ("adapted", adapted))
            for name, run in runs_from(init).items()}
    report(args, runs, test)


if __name__ == "__main__":
    main()
