"""Retrieval (top-5 cosine neighbours) and k-means with faiss vs scikit-learn, side by side.

Both sides get the same float32 features: a mixture of C Gaussian blobs in D dimensions (random,
but with a cluster structure so "same answers" is a meaningful check for k-means too). Retrieval:
Q queries against N database rows, exact search on both sides (faiss IndexFlatIP on normalised
features vs NearestNeighbors(metric="cosine", algorithm="brute")); answers agree when the top-5 index
sets are equal. K-means: C clusters, the same number of Lloyd iterations, one initialisation
each; answers agree when both partitions match the true blobs (adjusted Rand index).

    PYTHONPATH=. python bench/faiss_vs_sklearn.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from unsupft.eval.metrics import kmeans, nearest_neighbors


def blobs(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centers = g.normal(size=(clusters, dim)).astype(np.float32)
    labels = g.integers(0, clusters, n)
    return centers[labels] + g.normal(scale=0.5, size=(n, dim)).astype(np.float32), labels


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run(n: int, dim: int, queries: int, clusters: int, iterations: int, sklearn_kmeans_max: int) -> dict:
    x, truth = blobs(n, dim, clusters, seed=n)
    q = x[:queries] + np.random.default_rng(1).normal(scale=0.1, size=(queries, dim)).astype(np.float32)

    faiss_nn, faiss_nn_s = timed(lambda: nearest_neighbors(q, x, 5))
    sk = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute")
    sk_nn, sk_nn_s = timed(lambda: sk.fit(x).kneighbors(q, return_distance=False))
    same_sets = float(np.mean([set(a) == set(b) for a, b in zip(faiss_nn, sk_nn)]))

    faiss_km, faiss_km_s = timed(lambda: kmeans(x, clusters, seed=0, iterations=iterations))
    # sklearn's k-means normalised the same way as unsupft's (cosine geometry), Lloyd, one init.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sub = min(n, sklearn_kmeans_max)
    sk_model = KMeans(clusters, n_init=1, max_iter=iterations, tol=0.0, algorithm="lloyd", random_state=0)
    sk_km, sk_km_s = timed(lambda: sk_model.fit_predict(xn[:sub]))
    sk_km_full_s = sk_km_s * n / sub  # Lloyd's cost is linear in N
    return {
        "n": n, "dim": dim, "queries": queries, "clusters": clusters, "iterations": iterations,
        "retrieval_faiss_s": round(faiss_nn_s, 3), "retrieval_sklearn_s": round(sk_nn_s, 3),
        "retrieval_speedup": round(sk_nn_s / faiss_nn_s, 1), "retrieval_same_top5_share": same_sets,
        "kmeans_faiss_s": round(faiss_km_s, 3), "kmeans_sklearn_s": round(sk_km_full_s, 3),
        "kmeans_sklearn_measured_on": sub,
        "kmeans_speedup": round(sk_km_full_s / faiss_km_s, 1),
        "kmeans_ari_faiss_vs_truth": round(adjusted_rand_score(truth, faiss_km), 4),
        "kmeans_ari_sklearn_vs_truth": round(adjusted_rand_score(truth[:sub], sk_km), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--sklearn-kmeans-max", type=int, default=100_000,
                        help="time sklearn k-means on at most this many rows and scale linearly")
    args = parser.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}))
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(run(n, args.dim, args.queries, args.clusters, args.iterations, args.sklearn_kmeans_max)), flush=True)


if __name__ == "__main__":
    main()
