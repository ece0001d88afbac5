"""Evaluation metrics against brute-force / loop transcriptions of their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unsupft.eval import metrics


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_top1_and_mean_class_accuracy_by_hand():
    labels = np.array([0, 0, 0, 1])
    predictions = np.array([0, 0, 0, 0])
    assert metrics.top1_accuracy(predictions, labels) == 0.75
    assert metrics.mean_class_accuracy(predictions, labels) == 0.5  # class 0: 1.0, class 1: 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_bruteforce_numpy(seed):
    g = rng(seed)
    db, queries = g.normal(size=(300, 16)), g.normal(size=(40, 16))
    db_labels, query_labels = g.integers(0, 4, 300), g.integers(0, 4, 40)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    shares = []
    for i in range(len(queries)):
        top5 = np.argsort(-cos[i])[:5]
        shares.append(np.mean(db_labels[top5] == query_labels[i]))
    expected = float(np.mean(shares))
    assert metrics.retrieval_accuracy(queries, query_labels, db, db_labels, k=5) == pytest.approx(expected, abs=1e-12)


def test_retrieval_perfect_when_classes_are_separated():
    centers = np.eye(3) * 10
    labels = np.repeat(np.arange(3), 20)
    feats = centers[labels] + rng(0).normal(scale=0.1, size=(60, 3))
    assert metrics.retrieval_accuracy(feats, labels, feats, labels) == 1.0


def slow_bcubed_precision(clusters, labels):
    n = len(clusters)
    total = 0.0
    for e in range(n):
        same_cluster = [o for o in range(n) if clusters[o] == clusters[e]]
        total += sum(labels[o] == labels[e] for o in same_cluster) / len(same_cluster)
    return total / n


def slow_bcubed_recall(clusters, labels):
    """Per item, the share of the items with its label that share its cluster: the precision loop
    with the two roles swapped (the hand-worked cases below check it on its own)."""
    return slow_bcubed_precision(labels, clusters)


def slow_bcubed_f(clusters, labels):
    p, r = slow_bcubed_precision(clusters, labels), slow_bcubed_recall(clusters, labels)
    return 2 * p * r / (p + r)


def test_bcubed_recall_hand_worked():
    # One cluster holds everything: every item finds all of its class there -> recall 1.
    assert metrics.bcubed_recall(np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1])) == 1.0
    # Singletons split each class of 2: each item finds 1 of its 2 -> 0.5; precision 1, F 2/3.
    singletons, pairs = np.arange(4), np.array([0, 0, 1, 1])
    assert metrics.bcubed_recall(singletons, pairs) == 0.5
    assert metrics.bcubed_f(metrics.bcubed_precision(singletons, pairs), 0.5) == pytest.approx(2 / 3)
    # Clusters {a, a, b}, {b}: items a find 2/2, the b in the big cluster 1/2, the lone b 1/2 -> 3/4.
    assert metrics.bcubed_recall(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == 0.75


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bcubed_recall_and_f_match_loop(seed):
    g = rng(seed)
    clusters, labels = g.integers(0, 6, 90), g.integers(3, 8, 90)
    recall = metrics.bcubed_recall(clusters, labels)
    assert recall == pytest.approx(slow_bcubed_recall(clusters, labels))
    f = metrics.bcubed_f(metrics.bcubed_precision(clusters, labels), recall)
    assert f == pytest.approx(slow_bcubed_f(clusters, labels))


def test_bcubed_precision_hand_worked():
    # One pure cluster -> 1.
    assert metrics.bcubed_precision(np.array([0, 0, 1, 1]), np.array([5, 5, 7, 7])) == 1.0
    # Everything in one cluster, two classes of 2: each item shares its label with 2 of 4 -> 0.5.
    assert metrics.bcubed_precision(np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1])) == 0.5
    # Singletons are always precise.
    assert metrics.bcubed_precision(np.arange(5), np.array([0, 0, 1, 1, 2])) == 1.0
    # Cluster A = {a, a, b}: items a get 2/3, item b gets 1/3; cluster B = {b}: 1. -> (2/3+2/3+1/3+1)/4.
    assert metrics.bcubed_precision(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])) == pytest.approx(2.6667 / 4, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bcubed_precision_matches_loop(seed):
    g = rng(seed)
    clusters, labels = g.integers(0, 5, 80), g.integers(10, 14, 80)
    assert metrics.bcubed_precision(clusters, labels) == pytest.approx(slow_bcubed_precision(clusters, labels))


def test_kmeans_is_seeded_and_recovers_separated_clusters():
    labels = np.repeat(np.arange(4), 30)
    directions = np.eye(8)[:4]
    feats = directions[labels] + rng(1).normal(scale=0.05, size=(120, 8))
    scores = metrics.clustering_bcubed(feats, labels, seed=0)
    assert scores == {"cluster_bcubed_precision": 1.0, "cluster_bcubed_recall": 1.0, "cluster_bcubed_f": 1.0}
    noise = rng(2).normal(size=(200, 8))
    assert np.array_equal(metrics.kmeans(noise, 5, seed=3), metrics.kmeans(noise, 5, seed=3))


def slow_s_dbw(x, labels):
    """Direct transcription of Halkidi & Vazirgiannis (2001), one loop per sum."""
    groups = sorted(set(labels.tolist()))
    c = len(groups)
    dims = x.shape[1]

    def var_vector(points):
        mean = [sum(p[d] for p in points) / len(points) for d in range(dims)]
        return [sum((p[d] - mean[d]) ** 2 for p in points) / len(points) for d in range(dims)], mean

    def norm(v):
        return math.sqrt(sum(t * t for t in v))

    clusters = {g: [x[i] for i in range(len(x)) if labels[i] == g] for g in groups}
    sigma_x, _ = var_vector(list(x))
    sigmas, centers = {}, {}
    for g in groups:
        sigmas[g], centers[g] = var_vector(clusters[g])
    scat = sum(norm(sigmas[g]) for g in groups) / c / norm(sigma_x)
    stdev = math.sqrt(sum(norm(sigmas[g]) for g in groups)) / c

    def density(points, u):
        return sum(1 for p in points if norm([p[d] - u[d] for d in range(dims)]) <= stdev)

    dens = 0.0
    for gi in groups:
        for gj in groups:
            if gi == gj:
                continue
            union = clusters[gi] + clusters[gj]
            u = [(centers[gi][d] + centers[gj][d]) / 2 for d in range(dims)]
            top = max(density(union, centers[gi]), density(union, centers[gj]))
            dens += density(union, u) / top if top else 0.0
    return scat + dens / (c * (c - 1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_s_dbw_matches_definition(seed):
    g = rng(seed)
    labels = g.integers(0, 3, 45)
    x = g.normal(size=(45, 4)) + labels[:, None] * (seed * 0.7)  # from overlapping to separated
    assert metrics.s_dbw(x, labels) == pytest.approx(slow_s_dbw(x, labels), rel=1e-10)


def test_s_dbw_lower_for_separated_groups():
    g = rng(0)
    labels = np.repeat(np.arange(3), 30)
    noise = g.normal(size=(90, 5))
    separated = noise + np.eye(5)[labels] * 20
    assert metrics.s_dbw(separated, labels) < metrics.s_dbw(noise, labels)


def test_linear_probe_learns_separable_features():
    g = rng(0)
    labels = np.repeat(np.arange(3), 40)
    feats = np.eye(6)[labels] * 3 + g.normal(size=(120, 6))
    train, test = np.arange(120) % 2 == 0, np.arange(120) % 2 == 1
    assert metrics.linear_probe_accuracy(feats[train], labels[train], feats[test], labels[test]) > 0.9
