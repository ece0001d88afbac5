"""Pretrain images/s: unsupft's MoCo v2 step (through the training loop) vs lightly's MoCo v2.

Both train the same `tiny` backbone (1x32x32 input), the same 2-layer 128-d head, momentum 0.99,
a queue of 4096, temperature 0.2, SGD lr 0.03 momentum 0.9 wd 1e-4, on the same pre-augmented
batches (MoCo v2 augmentations from unsupft.data.augment, generated once, so augmentation cost is
out of the comparison), with the same intra-op thread count. lightly's side follows its MoCo v2
example: `MoCoProjectionHead`, `update_momentum`, `NTXentLoss(memory_bank_size=...)`.
Each variant runs in its own process (peak RSS per variant) and the variants alternate over
`--rounds`, so load from other processes hits both alike; best round reported.

    PYTHONPATH=. python bench/pretrain_speed.py [--batch 256] [--steps 20] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import unsupft._torchvision  # noqa: F401  (before lightly imports torchvision)
from unsupft.data.augment import moco_v2_augment
from unsupft.preprocess import to_input
from unsupft.models import build_backbone


def batches(n_batches: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8)
    augment = moco_v2_augment((32, 32))
    return [tuple(torch.stack([to_input(augment(x)) for x in images]) for _ in range(2)) for _ in range(n_batches)]


class Pregenerated:
    """The same pre-made batches for both libraries, as the loop's BatchSource."""

    def __init__(self, data) -> None:
        self.data = data

    def batches(self, start_step: int, steps: int, rank: int = 0, world_size: int = 1):
        return (self.data[i % len(self.data)] for i in range(start_step, steps))


def run_unsupft(data, steps: int) -> float:
    from unsupft.models.moco import MoCo
    from unsupft.train.loop import LoopConfig, train
    from unsupft.stages.moco_common import MoCoTask

    moco = MoCo(build_backbone("tiny", 1), queue_size=4096, momentum=0.99)
    with tempfile.TemporaryDirectory() as out:
        cfg = LoopConfig(out=out, steps=steps, lr=0.03, progress=False, log_every=steps, amp="auto")
        start = time.perf_counter()
        train(MoCoTask(moco), Pregenerated(data), cfg)
        return time.perf_counter() - start


def run_lightly(data, steps: int) -> float:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    backbone = build_backbone("tiny", 1)
    head = MoCoProjectionHead(backbone.out_dim, backbone.out_dim, 128)
    key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(key_backbone)
    deactivate_requires_grad(key_head)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        x_q, x_k = data[step % len(data)]
        update_momentum(backbone, key_backbone, m=0.99)
        update_momentum(head, key_head, m=0.99)
        query = head(backbone(x_q))
        with torch.no_grad():
            key = key_head(key_backbone(x_k))
        loss = criterion(query, key)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def child(variant: str, batch: int, steps: int) -> None:
    data = batches(4, batch)
    seconds = (run_unsupft if variant == "unsupft" else run_lightly)(data, steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "images_per_s": steps * batch / seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.batch, args.steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {"unsupft": [], "lightly": []}
    for _ in range(args.rounds):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                                  "--steps", str(args.steps), "--threads", str(args.threads)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    best = {v: max(r["images_per_s"] for r in rs) for v, rs in runs.items()}
    print(json.dumps({"batch": args.batch, "steps": args.steps, "threads": args.threads, "runs": runs,
                      "best_images_per_s": {k: round(v, 1) for k, v in best.items()},
                      "unsupft_over_lightly": round(best["unsupft"] / best["lightly"], 3)}, indent=1))


if __name__ == "__main__":
    main()
