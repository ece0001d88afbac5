"""A short MoCo pretrain on source digits gives better target features than a random network (kNN).

Source and target are class-disjoint (digits 0-4 and 5-9, as `unsupft ingest --classes` makes them),
so the pretrained features have to transfer to classes they never saw.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.adapt_study import few_shot_knn  # the studies' metric, so test and studies measure alike
from unsupft.data import load_arrays
from unsupft.models import build_backbone, load_backbone

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def test_short_pretrain_on_the_source_beats_random_features_on_the_target(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "unsupft", *map(str, a)], env=ENV, check=True,  # noqa: E731
                                    capture_output=True)
    run("ingest", "sklearn:digits", tmp_path / "src", "--classes", "0,1,2,3,4", "--unlabeled")
    run("ingest", "sklearn:digits", tmp_path / "tgt", "--classes", "5,6,7,8,9", "--split", "0.3")
    run("pretrain", "--data", tmp_path / "src", "--out", tmp_path / "moco", "--steps", 80, "--batch-size", 64,
        "--lr", 0.06, "--queue-size", 512, "--key-momentum", 0.99, "--augment", "crop,jitter", "--workers", 0,
        "--checkpoint-every", 0)
    train, test = load_arrays(str(tmp_path / "tgt" / "train")), load_arrays(str(tmp_path / "tgt" / "test"))
    random_accs = []
    for seed in range(3):  # random networks differ by several points: compare with their mean
        torch.manual_seed(seed)
        random_accs.append(few_shot_knn(build_backbone("tiny", 1), train, test))
    pretrained_acc = few_shot_knn(load_backbone(str(tmp_path / "moco"))[0], train, test)
    # measured: random 0.564 / 0.650 / 0.684 (mean 0.633), pretrained 0.737 (5 classes, 5 references each)
    assert pretrained_acc > statistics.mean(random_accs) + 0.05, (pretrained_acc, random_accs)
