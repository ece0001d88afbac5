"""Anchor-Constrained KMeans (ACKMeans): which unlabeled samples to label next.

The "1 + epsilon" protocol labels a few samples per round. Plain KMeans would happily put a new
center on a region that is already labeled. ACKMeans clusters the features with m *anchor* centers
(the features of the samples labeled so far) that never move and K *new* centers that do: every
sample still joins its nearest center, so the samples around a labeled one are held by its anchor
and the new centers settle on the regions that no label explains yet. The sample nearest to each new
center (the *eigen-sample*) is the one sent to the annotator.

Algorithm (the reference is a plain loop of the paper's Algorithm 1, see tests/test_ackmeans.py):
  1. anchors A = features of the labeled samples; K new centers by k-means++ seeding among the
     unlabeled samples, with the anchors counted as centers already chosen (so seeds avoid labeled
     regions);
  2. repeat: assign every sample to its nearest center among [A; C]; move each new center to the
     mean of its samples (renormalised for cosine); a new center that lost all its samples is
     re-seeded at the sample farthest from its own center; stop when no assignment changes;
  3. eigen-samples: for each new center the nearest unlabeled sample, all distinct.

Everything is batched tensor algebra on the features' device (the GPU when there is one): one
matmul per sample block per iteration, no Python loop over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from unsupft.distributed import default_device

Metric = Literal["l2", "cosine"]


@dataclass
class ACKMeansResult:
    centers: torch.Tensor  # [K, d] the new centers (anchors are not repeated here)
    eigen: torch.Tensor  # [K] long: index of the unlabeled sample nearest to each new center
    assignment: torch.Tensor  # [N] long: 0..m-1 = anchor, m..m+K-1 = new center
    iterations: int


def _prepare(x: torch.Tensor, metric: Metric) -> torch.Tensor:
    x = x if x.is_floating_point() else x.float()
    return F.normalize(x, dim=1) if metric == "cosine" else x


def _center_terms(x: torch.Tensor, centers: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The part of the distance that depends on the center: ||c||^2 - 2 x.c (L2) or 1 - x.c (cosine).

    For L2 the ||x||^2 term is the same for every center, so argmin needs only this: one fused matmul.
    """
    if metric == "cosine":
        return torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), x, centers.T, alpha=-1.0)
    return torch.addmm((centers * centers).sum(1)[None, :], x, centers.T, alpha=-2.0)


def distances(x: torch.Tensor, centers: torch.Tensor, metric: Metric, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[n, k] squared L2 distances (cosine distances for normalised inputs)."""
    d = _center_terms(x, centers, metric)
    if metric == "l2":
        d.add_(((x * x).sum(1) if x_sq is None else x_sq)[:, None])
    return d.clamp_min_(0.0)


def nearest(x: torch.Tensor, centers: torch.Tensor, metric: Metric, block: int,
            x_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each row's nearest center, block by block to bound memory (`x_sq`: None for cosine)."""
    best_d = torch.empty(len(x), dtype=x.dtype, device=x.device)
    best_i = torch.empty(len(x), dtype=torch.long, device=x.device)
    for start in range(0, len(x), block):
        rows = slice(start, start + block)
        d, i = _center_terms(x[rows], centers, metric).min(dim=1)
        if metric == "l2":
            d += x_sq[rows]
        best_d[rows] = d.clamp_min_(0.0)
        best_i[rows] = i
    return best_d, best_i


def _kmeanspp(x: torch.Tensor, x_sq: torch.Tensor | None, anchors: torch.Tensor, free: torch.Tensor, k: int,
              metric: Metric, generator: torch.Generator, block: int) -> torch.Tensor:
    """Greedy k-means++ seeding among the free samples, the anchors counting as chosen centers.

    Each step draws a few candidates with probability proportional to their distance to the nearest
    chosen center (anchors included) and keeps the one that lowers the total distance most, as
    scikit-learn does: plain k-means++ lands on an already-labeled region a few percent of the time.
    """
    trials = max(3, 2 + int(math.log(k)))
    free_w = free.to(x.dtype)
    if len(anchors):
        d2 = nearest(x, anchors, metric, block, x_sq)[0]
    else:  # nothing chosen yet: the first seed is uniform among the free samples
        d2 = torch.full((len(x),), float("inf"), dtype=x.dtype, device=x.device)
    chosen: list[int] = []
    for _ in range(k):
        weights = (torch.nan_to_num(d2, posinf=1.0) * free_w).double().cpu()
        if weights.sum() <= 0:  # every free sample sits on a center already: any unchosen one
            weights = free_w.double().cpu()
            weights[chosen] = 0.0
        cdf = weights.cumsum(0)  # inverse-CDF draws: cheaper than multinomial on 1M entries
        u = torch.rand(trials, generator=generator, dtype=torch.float64) * cdf[-1]
        cand = torch.searchsorted(cdf, u, right=True).clamp_max_(len(cdf) - 1).to(x.device)
        d_cand = torch.minimum(d2[:, None], distances(x, x[cand], metric, x_sq))
        best = int(d_cand.sum(0).argmin())
        chosen.append(int(cand[best]))
        d2 = d_cand[:, best].contiguous()
    return x[chosen].clone()


def _update(x: torch.Tensor, assign: torch.Tensor, dist: torch.Tensor, centers: torch.Tensor, m: int,
            free: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Means of the new clusters; empty ones re-seeded at the free samples farthest from their center."""
    k = len(centers)
    rel = assign - m
    mine = rel >= 0
    sums = torch.zeros_like(centers).index_add_(0, rel[mine], x[mine])
    counts = torch.bincount(rel[mine], minlength=k)
    new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centers)
    if metric == "cosine":
        new = F.normalize(new, dim=1)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        far = torch.where(free, dist, torch.full_like(dist, -1.0))
        far_idx = torch.topk(far, len(empty)).indices  # sorted: farthest first
        new[empty] = x[far_idx]
    return new


def eigen_samples(x: torch.Tensor, centers: torch.Tensor, free: torch.Tensor, metric: Metric,
                  block: int = 65536) -> torch.Tensor:
    """For each center the nearest free sample, all distinct.

    Each center keeps its K nearest free candidates (merged block by block, so memory stays
    [K, block]); centers are served in order of how close their best candidate is and each takes its
    nearest candidate not taken yet. K candidates per center always leave one (K-1 are taken at most).
    """
    k = len(centers)
    best_d = torch.full((k, 0), float("inf"), dtype=x.dtype, device=x.device)
    best_i = torch.zeros((k, 0), dtype=torch.long, device=x.device)
    for start in range(0, len(x), block):
        d = distances(centers, x[start : start + block], metric)
        d = d.masked_fill(~free[start : start + block][None, :], float("inf"))
        idx = torch.arange(start, start + d.shape[1], device=x.device).expand(k, -1)
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
        best_d, pos = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
        best_i = torch.gather(i, 1, pos)
    cand = best_i.cpu().tolist()
    order = torch.argsort(best_d[:, 0], stable=True).cpu().tolist()
    taken: set[int] = set()
    eigen = [0] * k
    for c in order:  # a loop over the K centers, never over the samples
        pick = next(i for i in cand[c] if i not in taken)
        taken.add(pick)
        eigen[c] = pick
    return torch.tensor(eigen, dtype=torch.long)


def ackmeans(features: torch.Tensor, anchor_idx: Sequence[int] | torch.Tensor, k: int, *, metric: Metric = "l2",
             seed: int = 0, max_iter: int = 100, init: torch.Tensor | None = None,
             device: torch.device | str | None = None, block: int = 65536) -> ACKMeansResult:
    """Cluster `features` [N, d] with the rows `anchor_idx` as fixed centers and `k` moving ones.

    Returns the new centers, their eigen-samples (indices into `features`, never an anchor, all
    distinct), the final assignment and the number of iterations. `init` [k, d] replaces the
    k-means++ seeding (the reference test uses it). Deterministic for a given seed and device.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', not {metric!r}")
    device = torch.device(device) if device is not None else default_device()
    x = _prepare(features.to(device), metric)
    n = len(x)
    anchor_idx = torch.as_tensor(anchor_idx, dtype=torch.long, device=device).flatten()
    free = torch.ones(n, dtype=torch.bool, device=device)
    free[anchor_idx] = False
    if k < 1 or k > int(free.sum()):
        raise ValueError(f"need 1 <= k <= unlabeled samples ({int(free.sum())}), got k={k}")
    anchors = x[anchor_idx]
    m = len(anchors)
    x_sq = (x * x).sum(1) if metric == "l2" else None
    if init is not None:
        centers = _prepare(init.to(device=device, dtype=x.dtype), metric).clone()
    else:
        generator = torch.Generator().manual_seed(seed)
        centers = _kmeanspp(x, x_sq, anchors, free, k, metric, generator, block)

    assign = torch.full((n,), -1, dtype=torch.long, device=device)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        dist, new_assign = nearest(x, torch.cat([anchors, centers]), metric, block, x_sq)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        centers = _update(x, assign, dist, centers, m, free, metric)
    return ACKMeansResult(centers=centers, eigen=eigen_samples(x, centers, free, metric, block).to(features.device),
                          assignment=assign.to(features.device), iterations=iterations)
