"""ACKMeans speed on 100k and 1M x 128 features, against scikit-learn KMeans as the reference cost.

One selection round of `unsupft label` on a 100-class target: m = 100 anchors (the labels so far),
K = 100 new centers. scikit-learn's KMeans clusters the same features into m + K centers (no
anchors: it cannot keep centers fixed), one init, the same iteration cap. Both are timed side by
side in one process; the ratio is the number to read on a shared machine.

    PYTHONPATH=. python bench/ackmeans_speed.py [--sizes 100000 1000000] [--max-iter 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from sklearn.cluster import KMeans

from unsupft.distributed import default_device
from unsupft.select.ackmeans import ackmeans


def features(n: int, dim: int, clusters: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(clusters, dim, generator=g)
    which = torch.randint(clusters, (n,), generator=g)
    return means[which] + torch.randn(n, dim, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--anchors", type=int, default=100)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--skip-sklearn-above", type=int, default=1_000_000)
    args = ap.parse_args()
    device = default_device()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "device": str(device),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}))
    for n in args.sizes:
        x = features(n, args.dim, 2 * (args.anchors + args.k))
        anchors = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: args.anchors]
        xd = x.to(device)
        ackmeans(xd[:10_000], torch.arange(10), 10, max_iter=2)  # warm-up (CUDA context, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = ackmeans(xd, anchors, args.k, max_iter=args.max_iter, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_ack = time.perf_counter() - t0
        row = {"n": n, "dim": args.dim, "anchors": args.anchors, "k": args.k,
               "ackmeans_s": round(t_ack, 2), "ackmeans_iters": res.iterations}
        if n <= args.skip_sklearn_above:
            km = KMeans(args.anchors + args.k, n_init=1, max_iter=args.max_iter, tol=0.0,
                        random_state=0, algorithm="lloyd")
            t0 = time.perf_counter()
            km.fit(x.numpy().astype(np.float32))
            t_sk = time.perf_counter() - t0
            row.update(sklearn_s=round(t_sk, 2), sklearn_iters=int(km.n_iter_),
                       sklearn_over_ackmeans=round(t_sk / t_ack, 2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
