"""SupCon and the two Bi-tuning losses against slow loop transcriptions of their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unsupft.losses import bituning_categorical_contrastive, bituning_contrastive_ce, supcon_loss


def slow_supcon(z: torch.Tensor, y: torch.Tensor, tau: float) -> float:
    total, anchors = 0.0, 0
    n = len(z)
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def slow_positive_set_ce(anchor_of, own_key, queue, y, tau):
    """Per sample: softmax over {own key} + every queued key; uniform target over own key + own-class keys."""
    c_count, k_count, _ = queue.shape
    total = 0.0
    for i in range(len(y)):
        a = anchor_of(i)
        keys = [own_key(i)] + [queue[c, k] for c in range(c_count) for k in range(k_count)]
        denom = sum(math.exp(float(a @ key) / tau) for key in keys)
        positives = [own_key(i)] + [queue[int(y[i]), k] for k in range(k_count)]
        total += -sum(math.log(math.exp(float(a @ p) / tau) / denom) for p in positives) / (k_count + 1)
    return total / len(y)


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_matches_loop(seed):
    z = unit(12, 8, seed=seed)
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(seed))
    y[0] = 99  # an anchor without positives must be left out, not counted as zero
    assert supcon_loss(z, y, tau=0.3).item() == pytest.approx(slow_supcon(z, y, 0.3), rel=1e-9)


def test_supcon_without_positives_is_zero_and_differentiable():
    z = unit(4, 8, seed=3).requires_grad_()
    loss = supcon_loss(z, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None


def test_supcon_prefers_clustered_classes():
    y = torch.tensor([0, 0, 1, 1])
    clustered = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    mixed = clustered[[0, 2, 1, 3]]
    assert supcon_loss(clustered, y) < supcon_loss(mixed, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_bituning_contrastive_ce_matches_loop(seed):
    c, k, f, n = 3, 4, 6, 5
    h, w, queue = unit(n, f, seed=seed), unit(c, f, seed=seed + 10), unit(c, k, f, seed=seed + 20)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    expected = slow_positive_set_ce(lambda i: w[int(y[i])], lambda i: h[i], queue, y, 0.07)
    assert bituning_contrastive_ce(h, w, y, queue, tau=0.07).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_bituning_categorical_contrastive_matches_loop(seed):
    c, k, d, n = 4, 3, 5, 6
    q, key, queue = unit(n, d, seed=seed), unit(n, d, seed=seed + 10), unit(c, k, d, seed=seed + 20)
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    expected = slow_positive_set_ce(lambda i: q[i], lambda i: key[i], queue, y, 0.07)
    assert bituning_categorical_contrastive(q, key, y, queue, tau=0.07).item() == pytest.approx(expected, rel=1e-9)


def test_bituning_losses_backpropagate_to_queries_only():
    q = unit(4, 5, seed=0).requires_grad_()
    queue = unit(2, 3, 5, seed=1)
    bituning_categorical_contrastive(q, unit(4, 5, seed=2), torch.tensor([0, 1, 0, 1]), queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and not queue.requires_grad
