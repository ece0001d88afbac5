"""ACKMeans against a slow plain-NumPy loop of Algorithm 1, and its behaviour on planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unsupft.select.ackmeans import ackmeans


def reference_ackmeans(x, anchor_idx, init, metric, max_iter=100):
    """Algorithm 1 written out sample by sample: anchors fixed, new centers move to their means."""
    x = np.array(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    anchors = x[anchor_idx]
    centers = np.array(init, dtype=np.float64)
    if metric == "cosine":
        centers = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    m, k = len(anchors), len(centers)

    def dist(a, b):
        return 1.0 - float(a @ b) if metric == "cosine" else float(((a - b) ** 2).sum())

    assign = [-1] * len(x)
    for _ in range(max_iter):
        all_centers = list(anchors) + list(centers)
        new_assign, own = [], []
        for sample in x:
            ds = [dist(sample, c) for c in all_centers]
            j = int(np.argmin(ds))
            new_assign.append(j)
            own.append(ds[j])
        if new_assign == assign:
            break
        assign = new_assign
        empty = []
        for j in range(k):
            members = [x[i] for i in range(len(x)) if assign[i] == m + j]
            if members:
                mean = np.mean(members, axis=0)
                centers[j] = mean / np.linalg.norm(mean) if metric == "cosine" else mean
            else:
                empty.append(j)
        if empty:
            free_far = sorted(
                (i for i in range(len(x)) if i not in set(anchor_idx)), key=lambda i: -own[i]
            )
            for j, i in zip(empty, free_far):
                centers[j] = x[i]
    eigen = []
    for j in range(k):
        ds = [(dist(x[i], centers[j]), i) for i in range(len(x)) if i not in set(anchor_idx)]
        eigen.append(min(ds)[1])
    return centers, np.array(assign), eigen


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop(metric, seed):
    g = np.random.default_rng(seed)
    x = g.normal(size=(120, 5))
    anchor_idx = [3, 17, 40, 99]
    init = x[[5, 6, 7, 50, 80]] + 0.01 * g.normal(size=(5, 5))
    ref_centers, ref_assign, ref_eigen = reference_ackmeans(x, anchor_idx, init, metric)

    xt = torch.from_numpy(x)
    res = ackmeans(xt, anchor_idx, 5, metric=metric, init=torch.from_numpy(init), device="cpu")
    assert torch.equal(xt, torch.from_numpy(x)), "features must not be modified"
    np.testing.assert_array_equal(res.assignment.numpy(), ref_assign)
    np.testing.assert_allclose(res.centers.numpy(), ref_centers, rtol=1e-9, atol=1e-9)
    # Each anchor is still where its labeled sample is: the samples it holds are nearer to that
    # sample than to any other center.
    assert set(res.assignment[anchor_idx].tolist()) == set(range(len(anchor_idx)))
    # Eigen-samples are the reference's nearest unlabeled samples whenever those are distinct.
    if len(set(ref_eigen)) == len(ref_eigen):
        assert res.eigen.tolist() == ref_eigen
    assert len(set(res.eigen.tolist())) == 5
    assert not set(res.eigen.tolist()) & set(anchor_idx)


def test_empty_cluster_is_reseeded_from_farthest_point():
    g = np.random.default_rng(0)
    x = g.normal(size=(60, 3))
    x[59] = [40.0, 40.0, 40.0]  # an outlier far from everything
    anchor_idx = [0, 1]
    # two identical initial centers: the second gets no samples (ties go to the first) -> re-seeded
    init = np.stack([x[10], x[10], x[20]])
    ref_centers, ref_assign, _ = reference_ackmeans(x, anchor_idx, init, "l2")
    res = ackmeans(torch.from_numpy(x), anchor_idx, 3, init=torch.from_numpy(init), device="cpu")
    np.testing.assert_array_equal(res.assignment.numpy(), ref_assign)
    np.testing.assert_allclose(res.centers.numpy(), ref_centers, atol=1e-9)
    assert 59 in res.eigen.tolist(), "the far outlier should have become its own cluster"


def planted(n_clusters=10, per=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 20.0 * torch.randn(n_clusters, dim, generator=g)
    x = means.repeat_interleave(per, 0) + torch.randn(n_clusters * per, dim, generator=g)
    return x, torch.arange(n_clusters).repeat_interleave(per)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_covers_unlabeled_clusters_before_repeating_any(metric, seed):
    x, cluster = planted(seed=seed)
    labeled = [0, 45, 130]  # one sample from clusters 0, 1, 3
    covered = set(cluster[labeled].tolist())
    while len(covered) < 10:
        k = min(3, 10 - len(covered))
        res = ackmeans(x, labeled, k, metric=metric, seed=seed, device="cpu")
        picked = cluster[res.eigen].tolist()
        assert len(set(picked)) == k and not set(picked) & covered, (picked, covered)
        covered |= set(picked)
        labeled += res.eigen.tolist()
    assert len(set(labeled)) == len(labeled)


def test_deterministic_by_seed():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    a = ackmeans(x, [1, 2, 3], 7, seed=5, device="cpu")
    b = ackmeans(x, [1, 2, 3], 7, seed=5, device="cpu")
    assert torch.equal(a.eigen, b.eigen) and torch.equal(a.centers, b.centers)


def test_rejects_more_centers_than_unlabeled_samples():
    with pytest.raises(ValueError, match="unlabeled"):
        ackmeans(torch.randn(5, 2), [0, 1, 2], 3, device="cpu")
