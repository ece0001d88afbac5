"""Does `unsupft adapt` with source replay and/or CutMix beat naive unsupervised finetuning?

Two regimes (`--regime`):
- `digits` (the first study): source sklearn digits 0-4, target digits 5-9 (class-disjoint), 8x8.
- `fashion` (issue 12's): source Fashion-MNIST train (Debian's dataset-fashion-mnist, `--source-limit`
  images, unlabeled), target sklearn digits (all ten classes, 70/30 split: 1,258 train / 539 test)
  upscaled to 28 px (`--image-size 28`) -- another domain, a small target, and images large enough
  that a CutMix box is a patch.

One MoCo pretrain on the source, then per seed one `unsupft adapt` run per setting on the target
train split. Settings (`--settings`): naive (no replay, no mixing), mix (CutMix only), replay
(replay only), replay+mix, and replay+mix-whole (the whole replayed subset in every epoch: the
behaviour before `--replay-ratio`). Every setting runs `--steps` steps (equal compute); a replay
setting at ratio R sees the target as often as a setting without replay run for `steps / (1 + R)`
steps (equal target exposure: run the script again with `--settings naive --steps ...`; the
pretrained model is reused). Score: 5-shot 1-NN accuracy (cosine) on the target test
split, mean over 5 draws of the labeled references (tests/test_pretrain_quality.py's metric).

    PYTHONPATH=. python bench/adapt_study.py --work /tmp/adapt_study [--regime fashion] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unsupft.data import load_arrays
from unsupft.data.encode import Encoding, encode_array
from unsupft.data.shards import Sample, write_dataset
from unsupft.models import load_backbone
from unsupft.preprocess import preprocess

FASHION = Path("/usr/share/datasets/fashion-mnist")
SETTINGS = {
    "naive": ["--replay-fraction", "0", "--mix", "none"],
    "mix": ["--replay-fraction", "0", "--mix", "cutmix"],
    "replay": ["--mix", "none"],
    "replay+mix": ["--mix", "cutmix"],
    "replay+mix-whole": ["--mix", "cutmix", "--replay-ratio", "1000"],
}


def unsupft(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)


def few_shot_knn(backbone: torch.nn.Module, train, test, image_size: list[int] | None = None, shots: int = 5,
                 trials: int = 5) -> float:
    """Mean 1-NN accuracy (cosine) on `test` with `shots` random labeled references per class, the
    images resized to `image_size` (a model's recorded input size; None: as stored)."""
    backbone.eval()
    with torch.no_grad():
        ref, query = (F.normalize(backbone(preprocess(s.images, image_size)), dim=1) for s in (train, test))
    accs = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        picks = torch.cat([torch.nonzero(train.labels == c)[:, 0][
            torch.randperm(int((train.labels == c).sum()), generator=g)[:shots]] for c in range(len(train.classes))])
        accs.append((train.labels[picks][(query @ ref[picks].T).argmax(1)] == test.labels).float().mean().item())
    return sum(accs) / trials


def knn_of(model_uri: str, train, test) -> float:
    backbone, meta = load_backbone(model_uri)
    return few_shot_knn(backbone, train, test, meta.get("image_size"))


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
    ap.add_argument("--regime", choices=["digits", "fashion"], default="digits")
    ap.add_argument("--source-limit", type=int, default=20000, help="fashion: source images ingested.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["replay+mix", "naive"], choices=list(SETTINGS))
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--pretrain-lr", default="0.06")
    ap.add_argument("--lr", default="0.03")
    ap.add_argument("--replay-fraction", default="0.1")
    ap.add_argument("--replay-ratio", default="1.0")
    ap.add_argument("--queue-size", default="auto")
    ap.add_argument("--crop-scale", default="0.2")
    ap.add_argument("--target-limit", type=int, default=None, help="Keep only this many target train images.")
    args = ap.parse_args()
    work = Path(args.work)
    src, tgt = work / "src", work / "tgt"
    if args.regime == "digits":
        common = ["--augment", "crop,jitter"]
        if not (src / "train" / "dataset.json").exists():
            unsupft("ingest", "sklearn:digits", src, "--classes", "0,1,2,3,4", "--split", "0.3")
            unsupft("ingest", "sklearn:digits", tgt, "--classes", "5,6,7,8,9", "--split", "0.3")
        src = src / "train"
    else:  # no flip: digits have a left and a right; images are upscaled to the source's 28 px
        common = ["--augment", "crop,jitter", "--image-size", "28"]
        if not (src / "dataset.json").exists():
            unsupft("ingest", FASHION / "train-images-idx3-ubyte.gz", src, "--limit", args.source_limit, "--seed", "0",
                    "--unlabeled")
            unsupft("ingest", "sklearn:digits", tgt, "--split", "0.3", "--seed", "0")
    common += ["--batch-size", args.batch_size, "--queue-size", args.queue_size, "--key-momentum", "0.99",
               "--crop-scale", args.crop_scale, "--workers", "1", "--checkpoint-every", "0"]
    target_train = tgt / "train"
    if args.target_limit:  # the small-target regime replay is meant for
        target_train = work / f"tgt-{args.target_limit}"
        if not (target_train / "dataset.json").exists():
            write_subset(tgt / "train", target_train, args.target_limit)
    pre = work / f"pre-{args.pretrain_steps}-{args.crop_scale}"
    start = time.time()
    unsupft("pretrain", "--data", src, "--out", pre, "--steps", args.pretrain_steps, "--lr", args.pretrain_lr, *common)
    print(f"pretrain {time.time() - start:.0f} s", flush=True)
    train, test = load_arrays(str(tgt / "train")), load_arrays(str(tgt / "test"))
    results: dict[str, list[float]] = {"pretrained (no adapt)": [knn_of(str(pre), train, test)]}
    replay = ["--replay-source", src, "--replay-fraction", args.replay_fraction, "--replay-ratio", args.replay_ratio]
    for seed in args.seeds:
        for name in args.settings:
            extra = [*(replay if name.startswith("replay") else []), *SETTINGS[name]]
            out = work / f"{name}-{args.target_limit or 'all'}-{args.steps}-{seed}"
            start = time.time()
            unsupft("adapt", "--init", pre, "--target", target_train, *extra, "--out", out, "--steps", args.steps,
                    "--seed", seed, "--lr", args.lr, *common)
            results.setdefault(f"{name} ({args.steps} steps)", []).append(knn_of(str(out), train, test))
            print(name, args.steps, seed, round(results[f"{name} ({args.steps} steps)"][-1], 4),
                  f"{time.time() - start:.0f} s", flush=True)
    print("| setting | mean | std (seeds) | runs |\n|---|---|---|---|")
    for name, v in results.items():
        std = f"{statistics.pstdev(v):.3f}" if len(v) > 1 else "-"
        print(f"| {name} | {statistics.mean(v):.3f} | {std} | {', '.join(f'{x:.3f}' for x in v)} |")


if __name__ == "__main__":
    main()
