"""Losses of the seeds, each a small pure function of tensors.

Every function here takes plain tensors (features, labels, queues) and returns a scalar loss; the
model, the queues' updates and the optimisation live in the stages. Each is tested against a slow
loop transcription of its definition in tests/.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Supervised transfer losses (COIN's SupCon, Bi-tuning's two contrastive losses)
# --------------------------------------------------------------------------------------------


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, tau: float = 0.3) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form), as used by COIN.

    `features` [N, D] are L2-normalised embeddings (views of one image are simply rows with the
    same label), `labels` [N]. For anchor i the positives P(i) are the other rows with its label; the
    denominator runs over every row except i itself:

        L_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )

    An anchor is never its own positive; anchors without any positive (a class seen once in the
    batch) contribute nothing, and the loss is the mean over the anchors that have one. A batch in
    which no anchor has a positive gives 0 (still connected to the graph, so backward works).
    """
    n = features.shape[0]
    logits = features @ features.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    # Exclude the anchor from its own denominator (logsumexp keeps it finite).
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    num_pos = positives.sum(dim=1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return features.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(pos_log_prob[has_pos] / num_pos[has_pos]).mean()


def _positive_set_cross_entropy(anchor: torch.Tensor, own_positive: torch.Tensor, queue: torch.Tensor,
                                labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-entropy against a uniform target over {own positive} + the K queue entries of the anchor's class.

    Each `anchor` [N, F] has a logit (dot product / tau) with its own positive [N, F] and with every
    queued key, `queue` [C, K, F]; the softmax runs over all 1 + C*K logits. Shared by both Bi-tuning
    losses, which differ only in what plays anchor and keys.
    """
    own = (anchor * own_positive).sum(dim=1) / tau
    c, k, f = queue.shape
    queue_logits = (anchor @ queue.reshape(c * k, f).T).reshape(-1, c, k) / tau
    n = anchor.shape[0]
    all_logits = torch.cat([own[:, None], queue_logits.reshape(n, -1)], dim=1)
    log_norm = torch.logsumexp(all_logits, dim=1)
    own_class = queue_logits[torch.arange(n, device=labels.device), labels]  # [N, K]
    positive_sum = own + own_class.sum(dim=1)
    return (log_norm - positive_sum / (k + 1)).mean()


def bituning_contrastive_ce(features: torch.Tensor, class_weights: torch.Tensor, labels: torch.Tensor,
                            queue: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Bi-tuning's contrastive cross-entropy on the classifier head (Zhong et al. 2020, Eq. 3-4).

    The classifier's weight vector of the anchor's class is the *query*: it should score the
    features of its own class (this sample and the K queued keys of its class) above the queued
    keys of every other class. `features` [N, F] are the query encoder's L2-normalised features
    (the stage appends a constant 1 so the bias takes part), `class_weights` [C, F] the
    L2-normalised classifier rows [W | b], `queue` [C, K, F] the per-class key queues
    (normalised), `labels` [N]. With w = class_weights[y_i]:

        L_i = -1/(K+1) * sum_{p in {h_i} + queue[y_i]} log( exp(w.p / tau)
                                                    / (exp(w.h_i / tau) + sum_{c,k} exp(w.queue[c,k] / tau)) )
    """
    return _positive_set_cross_entropy(class_weights[labels], features, queue, labels, tau)


def bituning_categorical_contrastive(query: torch.Tensor, key: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor,
                                     tau: float = 0.07) -> torch.Tensor:
    """Bi-tuning's categorical contrastive loss on the projector head (Zhong et al. 2020, Eq. 5-6).

    Like MoCo, but every key of the query's class is a positive: the query's own key (the momentum
    encoder's view of the same image) and the K queued keys of its class; the queued keys of the
    other classes are the negatives. `query`, `key` [N, D] and `queue` [C, K, D] are L2-normalised
    projections, `labels` [N]:

        L_i = -1/(K+1) * sum_{p in {k_i} + queue[y_i]} log( exp(q_i.p / tau)
                                                    / (exp(q_i.k_i / tau) + sum_{c,k} exp(q_i.queue[c,k] / tau)) )
    """
    return _positive_set_cross_entropy(query, key, queue, labels, tau)


# --------------------------------------------------------------------------------------------
# Self-supervised losses (MoCo v2 and the mixed query of unsupervised finetuning)
# --------------------------------------------------------------------------------------------


def moco_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """`[N, 1 + K]` logits: column 0 is each query with its own key, the rest with the K queued keys.

    `query`, `key` [N, D] and `queue` [K, D] are L2-normalised.
    """
    positive = (query * key).sum(dim=1, keepdim=True)
    return torch.cat([positive, query @ queue.T], dim=1) / tau


def infonce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, tau: float = 0.2,
                 reduction: str = "mean") -> torch.Tensor:
    """MoCo's InfoNCE: -log( exp(q.k+/tau) / (exp(q.k+/tau) + sum_queue exp(q.n/tau)) ), averaged."""
    logits = moco_logits(query, key, queue, tau)
    target = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits.float(), target, reduction=reduction)


def mixed_query_loss(mixed_query: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, queue: torch.Tensor,
                     lam: float | torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """`lam * L(q_m, k_a) + (1 - lam) * L(q_m, k_b)`: a query mixed from images a and b is a positive
    for both keys, weighted by how much of each it holds. `lam` is a number or one per row [N].
    """
    loss_a = infonce_loss(mixed_query, key_a, queue, tau, reduction="none")
    loss_b = infonce_loss(mixed_query, key_b, queue, tau, reduction="none")
    return (lam * loss_a + (1 - lam) * loss_b).mean()


# --------------------------------------------------------------------------------------------
# Semi-supervised loss (FixMatch)
# --------------------------------------------------------------------------------------------


class FixMatchLoss(NamedTuple):
    total: torch.Tensor       # supervised + unlabeled_weight * unlabeled
    supervised: torch.Tensor  # CE on the labeled batch
    unlabeled: torch.Tensor   # the consistency term, unweighted (as logged)
    mask: torch.Tensor        # [U] float 0/1: which pseudo labels passed the threshold


def fixmatch_loss(labeled_logits: torch.Tensor, labels: torch.Tensor, weak_logits: torch.Tensor,
                  strong_logits: torch.Tensor, threshold: float = 0.95,
                  unlabeled_weight: float = 1.0) -> FixMatchLoss:
    """FixMatch (Sohn et al. 2020, Eq. 4): `supervised + unlabeled_weight * unlabeled`.

    `labeled_logits` [B, C] with `labels` [B]; `weak_logits`, `strong_logits` [U, C] are the weakly
    and strongly augmented views of the same U unlabeled images. Each weak view's arg-max is a hard
    pseudo label, kept where its softmax probability reaches `threshold` (`mask`); the strong view
    learns it by cross-entropy:

        unlabeled = 1/U * sum_u mask_u * CE(strong_u, argmax softmax(weak_u))

    The mean runs over all U images, not only the confident ones, so the unlabeled term grows as
    more pseudo labels pass the threshold. No gradient flows through the weak view (the pseudo
    label is a target). `mask.mean()` is the pseudo-label rate.
    """
    supervised = F.cross_entropy(labeled_logits, labels)
    with torch.no_grad():
        confidence, pseudo = torch.softmax(weak_logits.detach(), dim=1).max(dim=1)
        mask = (confidence >= threshold).to(strong_logits.dtype)
    unlabeled = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
    return FixMatchLoss(supervised + unlabeled_weight * unlabeled, supervised, unlabeled, mask)
