"""Evaluation metrics on features and predictions (NumPy in, floats out).

Feature metrics use faiss (exact inner-product search, k-means) because evaluation runs them on
whole train sets: see bench/faiss_vs_sklearn.py for the speed-up over scikit-learn at equal answers.
Every metric here is checked against a slow transcription of its definition in
tests/test_metrics.py.
"""

from __future__ import annotations

import faiss
import numpy as np


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def top1_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose predicted class equals the label."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def mean_class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy averaged over the classes present in `labels` (each class weighs the same)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)]))


def nearest_neighbors(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """Indices [Q, k] of the k most cosine-similar database rows of each query (exact search)."""
    database = _normalized(database)
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(database)
    _, neighbors = index.search(_normalized(queries), k)
    return neighbors


def retrieval_accuracy(query_features: np.ndarray, query_labels: np.ndarray, database_features: np.ndarray,
                       database_labels: np.ndarray, k: int = 5) -> float:
    """Each query retrieves its k nearest database items (cosine); the share of them with the query's
    label, averaged over queries."""
    neighbors = nearest_neighbors(query_features, database_features, k)
    return float(np.mean(np.asarray(database_labels)[neighbors] == np.asarray(query_labels)[:, None]))


def kmeans(features: np.ndarray, clusters: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """Cluster id [N] of each row: faiss k-means (Lloyd, seeded) on L2-normalised features.

    faiss subsamples to 256 points per centroid by default; evaluation wants the clustering of the
    whole set, so every point takes part in training."""
    x = _normalized(features)
    model = faiss.Kmeans(x.shape[1], clusters, niter=iterations, seed=seed, verbose=False,
                         max_points_per_centroid=-(-len(x) // clusters))
    model.train(x)
    _, assignment = model.index.search(x, 1)
    return assignment[:, 0]


def _contingency(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """n_ij: how many items of cluster i carry label j."""
    _, cluster_ids = np.unique(clusters, return_inverse=True)
    _, label_ids = np.unique(labels, return_inverse=True)
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.float64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    return table


def bcubed_precision(clusters: np.ndarray, labels: np.ndarray) -> float:
    """BCubed precision (Bagga & Baldwin 1998): for each item, the share of the items in its cluster
    that have its label, averaged over items. From the cluster x label contingency table n_ij:
    sum_ij n_ij^2 / n_i / N."""
    table = _contingency(clusters, labels)
    return float(np.sum(table**2 / table.sum(axis=1, keepdims=True)) / table.sum())


def bcubed_recall(clusters: np.ndarray, labels: np.ndarray) -> float:
    """BCubed recall: for each item, the share of the items with its label that are in its cluster,
    averaged over items: sum_ij n_ij^2 / n_j / N, which is precision with clusters and labels swapped."""
    return bcubed_precision(labels, clusters)


def bcubed_f(precision: float, recall: float) -> float:
    """BCubed F: the harmonic mean of BCubed precision and recall (Amigo et al. 2009)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def clustering_bcubed(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """KMeans with as many clusters as classes, scored against the labels: BCubed precision,
    recall and F (precision alone rewards many small clusters, recall one big one)."""
    clusters = kmeans(features, len(np.unique(labels)), seed=seed)
    precision, recall = bcubed_precision(clusters, labels), bcubed_recall(clusters, labels)
    return {"cluster_bcubed_precision": precision, "cluster_bcubed_recall": recall,
            "cluster_bcubed_f": bcubed_f(precision, recall)}


def s_dbw(features: np.ndarray, labels: np.ndarray) -> float:
    """S_Dbw validity index (Halkidi & Vazirgiannis 2001) of a partition; lower is better.

    S_Dbw = Scat + Dens_bw over the c groups given by `labels` with centres v_i (group means):
    - Scat = 1/c * sum_i ||sigma(v_i)|| / ||sigma(X)||, sigma = per-dimension variance vector;
    - stdev = 1/c * sqrt(sum_i ||sigma(v_i)||);
    - density(u) over the union of groups i and j = number of its points within stdev of u;
    - Dens_bw = 1/(c(c-1)) * sum_{i != j} density(u_ij) / max(density(v_i), density(v_j)),
      u_ij the midpoint of v_i and v_j (a 0/0 term, an empty neighbourhood everywhere, counts 0).
    """
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    groups = np.unique(labels)
    c = len(groups)
    members = [x[labels == g] for g in groups]
    centers = np.stack([m.mean(axis=0) for m in members])
    sigma_norms = np.array([np.linalg.norm(m.var(axis=0)) for m in members])
    scat = float(np.mean(sigma_norms) / np.linalg.norm(x.var(axis=0)))
    stdev = np.sqrt(sigma_norms.sum()) / c

    def density(points: np.ndarray, u: np.ndarray) -> int:
        return int(np.sum(np.linalg.norm(points - u, axis=1) <= stdev))

    total = 0.0
    for i in range(c):
        for j in range(i + 1, c):
            union = np.concatenate([members[i], members[j]])
            top = max(density(union, centers[i]), density(union, centers[j]))
            if top > 0:
                # Symmetric in (i, j): counted once, doubled below for the ordered pairs.
                total += 2 * density(union, (centers[i] + centers[j]) / 2) / top
    dens_bw = total / (c * (c - 1)) if c > 1 else 0.0
    return scat + dens_bw


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray) -> float:
    """Top-1 test accuracy of a logistic-regression classifier fit on frozen, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_features, train_labels)
    return top1_accuracy(probe.predict(test_features), test_labels)
