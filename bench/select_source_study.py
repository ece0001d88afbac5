"""Does `unsupft select-source`'s short-run ranking predict the outcome of pretraining for longer?

`--data fashion28`: Fashion-MNIST (Debian's files, 28 px): the target is `--target-size` test images
split 50/50 into the probe's train and test halves; the candidate sources are `own` (unlabeled train
images: the target's own classes, other images), `noise` (uniform noise images of the same size) and
`digits` (sklearn's digits, upscaled 3x and padded to 28 px: an unrelated set).
`--data digits8`: the test's data (tests/test_select_source.py): the target is 600 sklearn digits (8x8)
split 50/50; `own` is all 1,797 digits unlabeled, `noise` 600 noise images, `fashion` 600
Fashion-MNIST train images shrunk to 8x8 (unrelated).
The base is a randomly initialised tiny ResNet (seeded). Per seed: `select-source` with `--steps S`
(and the recipe options given: `--lr`, `--key-momentum`, `--crop-scale`, `--augment`) ranks the
candidates; then, unless `--long 0`, each candidate is pretrained from the same base for `--long` x S
steps (`unsupft pretrain`, otherwise the same options) and probed the same way
(`unsupft.stages.select_source.probe`). Printed: the probes per candidate and seed, each run's final
InfoNCE loss, whether the rankings agree, mean ± std, one JSON line per seed.

    PYTHONPATH=. python bench/select_source_study.py --work /tmp/select-study [--seeds 3] [--steps 30]
    PYTHONPATH=. python bench/select_source_study.py --data digits8 --work /tmp/select-digits --seeds 2 \
        --steps 150 --long 0 --lr 0.1 --key-momentum 0.99 --crop-scale 0.5 --augment crop,jitter,blur
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits

from unsupft.data.samples import open_samples
from unsupft.models import build_backbone, save_model
from unsupft.stages.ingest import ingest_command
from unsupft.stages.pretrain import pretrain_command
from unsupft.stages.select_source import probe, probe_sets, select_source_command

FASHION = "/usr/share/datasets/fashion-mnist/"
CANDIDATES = {"fashion28": ("own", "noise", "digits"), "digits8": ("own", "noise", "fashion")}
IMAGE_SIZE = {"fashion28": [28, 28], "digits8": [8, 8]}
RECIPE = ("lr", "key_momentum", "crop_scale", "augment")  # passed on to every run when given


def invoke(command, *args: object) -> None:
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def fashion_images(source_size: int) -> np.ndarray:
    with gzip.open(FASHION + "train-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:source_size]


def digits8(work: str) -> None:
    """The test's data sets (the same sizes and seeds), and 600 Fashion-MNIST images shrunk to 8x8
    (area average) as the unrelated one."""
    if os.path.exists(os.path.join(work, "fashion", "dataset.json")):
        return
    invoke(ingest_command, "sklearn:digits", f"{work}/target", "--split", "0.5", "--seed", "0", "--limit", 600)
    invoke(ingest_command, "sklearn:digits", f"{work}/own", "--seed", "1", "--unlabeled")
    np.savez(f"{work}/noise.npz", images=np.random.default_rng(0).integers(0, 256, (600, 8, 8), dtype=np.uint8))
    invoke(ingest_command, f"{work}/noise.npz", f"{work}/noise")
    fashion = torch.nn.functional.interpolate(torch.tensor(fashion_images(600), dtype=torch.float32)[:, None],
                                              size=(8, 8), mode="area")
    np.savez(f"{work}/fashion.npz", images=fashion[:, 0].round().clamp(0, 255).numpy().astype(np.uint8))
    invoke(ingest_command, f"{work}/fashion.npz", f"{work}/fashion")


def fashion28(work: str, target_size: int, source_size: int) -> None:
    if os.path.exists(os.path.join(work, "digits", "dataset.json")):
        return
    invoke(ingest_command, FASHION + "t10k-images-idx3-ubyte.gz", f"{work}/target", "--labels",
           FASHION + "t10k-labels-idx1-ubyte.gz", "--limit", target_size, "--split", "0.5")
    invoke(ingest_command, FASHION + "train-images-idx3-ubyte.gz", f"{work}/own", "--limit", source_size, "--unlabeled")
    noise = np.random.default_rng(0).integers(0, 256, (source_size, 28, 28), dtype=np.uint8)
    np.savez(f"{work}/noise.npz", images=noise)
    invoke(ingest_command, f"{work}/noise.npz", f"{work}/noise")
    digits = np.pad(np.kron(load_digits().images, np.ones((3, 3))) * (255 / 16), ((0, 0), (2, 2), (2, 2)))
    np.savez(f"{work}/digits.npz", images=digits.astype(np.uint8))
    invoke(ingest_command, f"{work}/digits.npz", f"{work}/digits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/unsupft-select-study")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="select-source's short run per candidate")
    parser.add_argument("--long", type=int, default=5, help="the long run is this many times --steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--target-size", type=int, default=1000)
    parser.add_argument("--source-size", type=int, default=2000)
    parser.add_argument("--data", choices=sorted(CANDIDATES), default="fashion28")
    parser.add_argument("--candidates", help="a comma list of the data's candidates (default: all)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--key-momentum", type=float)
    parser.add_argument("--crop-scale", type=float)
    parser.add_argument("--augment")
    args = parser.parse_args()
    candidates = args.candidates.split(",") if args.candidates else list(CANDIDATES[args.data])
    torch.set_num_threads(1)
    os.makedirs(args.work, exist_ok=True)
    if args.data == "digits8":
        digits8(args.work)
    else:
        fashion28(args.work, args.target_size, args.source_size)
    train, test = open_samples(f"{args.work}/target/train"), open_samples(f"{args.work}/target/test")
    sets = probe_sets(train, test, None, 0)
    common = ["--batch-size", args.batch_size, "--queue-size", args.queue_size, "--checkpoint-every", 0, "--workers", 0]
    common += [a for name in RECIPE if getattr(args, name) is not None for a in ("--" + name.replace("_", "-"), getattr(args, name))]
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        base = f"{args.work}/base-{seed}"
        torch.manual_seed(seed)
        save_model(f"{base}/model.pt", build_backbone("tiny", 1), "tiny", 1, IMAGE_SIZE[args.data])
        started = time.perf_counter()
        select = f"{args.work}/select-{seed}"
        invoke(select_source_command, "--init", base, *[a for c in candidates for a in ("--candidate", f"{c}={args.work}/{c}")],
               "--probe-train", f"{args.work}/target/train", "--probe-test", f"{args.work}/target/test",
               "--steps", args.steps, "--seed", seed, *common, "--out", select)
        ranking = json.load(open(f"{select}/ranking.json"))
        short = {r["name"]: r["linear_top1"] for r in ranking["ranking"]}
        short_s = time.perf_counter() - started
        short_loss = {name: final_loss(f"{select}/candidates/{name}") for name in candidates}
        long = {}
        for name in candidates if args.long else ():
            out = f"{args.work}/long-{name}-{seed}"
            invoke(pretrain_command, "--data", f"{args.work}/{name}", "--init", base, "--steps", args.steps * args.long,
                   "--seed", seed, *common, "--out", out)
            long[name] = probe(out, train, *sets)
        row = {"seed": seed, "base": ranking["base_linear_top1"], "short": short, "short_loss": short_loss,
               "long": long, "short_order": sorted(candidates, key=lambda c: -short[c]),
               "long_order": sorted(long, key=lambda c: -long[c]),
               "short_seconds": round(short_s, 1), "long_seconds": round(time.perf_counter() - started - short_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nshort = {args.steps} steps (select-source), long = {args.steps * args.long} steps; linear probe top-1")
    print("| candidate | short mean ± std | long mean ± std | short per seed | long per seed | short final InfoNCE |\n"
          "|---|---|---|---|---|---|")
    for name in (*candidates, "base"):
        short = [r["base"] if name == "base" else r["short"][name] for r in rows]
        long = [r["base"] if name == "base" else r["long"][name] for r in rows if args.long]
        losses = "" if name == "base" else ", ".join(f"{r['short_loss'][name]:.2f}" for r in rows)
        print(f"| {name} | {summary(short)} | {summary(long)} | {', '.join(f'{v:.3f}' for v in short)} | "
              f"{', '.join(f'{v:.3f}' for v in long)} | {losses} |")
    own_first = sum(r["short_order"][0] == "own" for r in rows)
    print(f"\n'own' first in the short ranking in {own_first} of {len(rows)} seeds", end="")
    if args.long:
        agree = sum(r["short_order"][0] == r["long_order"][0] for r in rows)
        print(f"; short and long runs pick the same source in {agree}; 'own' first after the long runs in "
              f"{sum(r['long_order'][0] == 'own' for r in rows)}", end="")
    print()


def summary(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-"


def final_loss(run: str) -> float:
    """The InfoNCE loss of a pretrain run's last logged step."""
    with open(f"{run}/metrics.jsonl") as f:
        return json.loads(f.read().splitlines()[-1])["infonce"]


if __name__ == "__main__":
    main()
