"""MoCo v2: losses against slow references, gradients, momentum order, queue, mixing, bn-only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from unsupft.data.augment import moco_v2_augment
from unsupft.preprocess import to_input
from unsupft.data.mixing import cutmix, mixup, rebalanced, replay_subset, with_replay
from unsupft.losses import infonce_loss, mixed_query_loss
from unsupft.models import build_backbone
from unsupft.models.moco import MoCo, freeze_all_but_bn


pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def slow_infonce(q, k, queue, tau):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i].detach() @ k[i]) / tau)
        neg = sum(math.exp(float(q[i].detach() @ n) / tau) for n in queue)
        total += -math.log(pos / (pos + neg))
    return total / len(q)


def test_infonce_matches_reference():
    torch.manual_seed(0)
    q, k, queue = unit(5, 8), unit(5, 8), unit(7, 8)
    assert infonce_loss(q, k, queue, 0.2).item() == pytest.approx(slow_infonce(q, k, queue, 0.2), rel=1e-6)


def test_mixed_query_loss_matches_reference():
    torch.manual_seed(1)
    qm, ka, kb, queue = unit(4, 6), unit(4, 6), unit(4, 6), unit(9, 6)
    lam = 0.3
    want = lam * slow_infonce(qm, ka, queue, 0.2) + (1 - lam) * slow_infonce(qm, kb, queue, 0.2)
    assert mixed_query_loss(qm, ka, kb, queue, lam, 0.2).item() == pytest.approx(want, rel=1e-6)
    lams = torch.tensor([0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    per_row = [lams[i] * slow_infonce(qm[i:i + 1], ka[i:i + 1], queue, 0.2)
               + (1 - lams[i]) * slow_infonce(qm[i:i + 1], kb[i:i + 1], queue, 0.2) for i in range(4)]
    assert mixed_query_loss(qm, ka, kb, queue, lams, 0.2).item() == pytest.approx(float(sum(per_row) / 4), rel=1e-6)


def make_moco(**kw):
    torch.manual_seed(0)
    return MoCo(build_backbone("tiny", 1), **{"dim": 16, "queue_size": 10, "momentum": 0.9, **kw})


def test_momentum_before_keys_queue_after_logits_and_no_key_grad():
    moco = make_moco(bn_splits=1)  # one BN batch: keys are then independent of the shuffle
    with torch.no_grad():  # make query and key encoders differ
        for p in moco.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old_queue = moco.queue.clone()
    expected_key_net = copy.deepcopy(moco)
    expected_key_net.momentum_update()
    im_q, im_k = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want_keys = F.normalize(expected_key_net.key_head(expected_key_net.key_backbone(im_k)), dim=1)
    loss, _ = moco(im_q, im_k)
    loss.backward()
    assert all(p.grad is None for p in [*moco.key_backbone.parameters(), *moco.key_head.parameters()])
    assert all(p.grad is not None for p in moco.backbone.parameters())
    assert torch.allclose(moco.queue[:4], want_keys, atol=1e-5)  # keys of the updated key encoder
    q = F.normalize(moco.head(moco.backbone(im_q)), dim=1).double()
    # the loss used the queue as it was before this step's keys went in
    assert loss.item() == pytest.approx(slow_infonce(q, want_keys.double(), old_queue.double(), 0.2), rel=1e-4)


def test_queue_wraps_around_for_any_batch_size():
    moco = make_moco()
    for _ in range(3):  # 3 x 4 keys into a queue of 10
        moco(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
    assert int(moco.queue_ptr) == 2
    moco.enqueue(torch.arange(13 * 16, dtype=torch.float32).view(13, 16))  # more keys than the queue holds
    # only the newest 10 of 13 fit: written from position 2 on, wrapping, the oldest kept one first
    assert int(moco.queue_ptr) == 2 and moco.queue[2, 0] == 3 * 16 and moco.queue[1, 0] == 12 * 16


def test_mixed_query_adds_its_loss():
    moco = make_moco()
    im = torch.randn(6, 1, 8, 8)
    partner = torch.roll(torch.arange(6), 1)
    mixed, lam = cutmix(im, partner)
    loss, metrics = moco(im, im.clone(), mixed=mixed, mix_partner=partner, lam=lam)
    assert loss.item() == pytest.approx((metrics["infonce"] + metrics["mix"]).item(), rel=1e-5)


def test_bn_only_changes_only_bn_affine_and_head():
    moco = make_moco()
    freeze_all_but_bn(moco)
    before = {k: v.clone() for k, v in moco.state_dict().items()}
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss, _ = moco(torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = moco.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    backbone_changed = {k for k in changed if k.startswith("backbone.")}
    assert backbone_changed and all(".bn" in k or "downsample.1" in k for k in backbone_changed)
    assert any(k.endswith("running_mean") for k in backbone_changed)  # statistics update too
    assert {"backbone.conv1.weight", "backbone.layer2.0.conv1.weight"}.isdisjoint(changed)
    assert {"head.0.weight", "head.2.weight"} <= changed


def test_cutmix_lam_is_the_area_ratio_and_mixup_blends():
    torch.manual_seed(3)
    a = torch.zeros(5, 1, 10, 12)
    a[1:] = 1.0  # image 0 is zeros, its partner is ones
    partner = torch.tensor([1, 0, 3, 4, 2])
    for _ in range(10):
        mixed, lam = cutmix(a, partner)
        assert mixed[0].mean().item() == pytest.approx(1 - lam)
    mixed, lam = mixup(a, partner)
    assert torch.allclose(mixed[0], torch.full_like(a[0], 1 - lam))


def test_epoch_compositions():
    order = rebalanced(n_source=100, n_target=7, target_ratio=0.2, seed=0)
    e0 = order(0)
    assert order.size == 120 and (e0 < 100).sum() == 100 and set((e0[e0 >= 100] - 100).tolist()) == set(range(7))
    assert torch.equal(order(3), rebalanced(100, 7, 0.2, 0)(3))  # deterministic per epoch
    subset = replay_subset(1000, 0.1, seed=4)
    assert len(subset) == 100 and torch.equal(subset, replay_subset(1000, 0.1, seed=4))
    assert not torch.equal(subset, replay_subset(1000, 0.1, seed=5))
    mixed = with_replay(50, subset, seed=0)(1)
    assert mixed.sort().values.tolist() == list(range(150))
    # replay sized by the target: the whole target and ratio * 50 draws from the 100-image subset
    half = with_replay(50, subset, seed=0, ratio=0.5)
    assert half.size == 75 and (half(2) < 50).sum() == 50 and len(set(half(2).tolist())) == 75
    assert with_replay(50, subset, seed=0, ratio=1000).size == 150  # at most the whole subset


def test_key_top1_counts_a_query_whose_own_key_wins():
    """The metric: column 0 of the logits is the positive and top-1 runs over the keys (axis 1).
    With identical views and the key encoder equal to the query encoder, every query's own key
    beats the random queue: key_top1 is 1 (a wrong axis or index would give ~0)."""
    torch.manual_seed(0)
    moco = make_moco(queue_size=4096, dim=128)
    images = torch.randn(16, 1, 8, 8)
    _, metrics = moco(images, images.clone())
    assert float(metrics["key_top1"]) == 1.0


def test_crop_scale_sets_the_smallest_crop():
    crop = moco_v2_augment((16, 16), ("crop",), crop_scale=0.5).transforms[0]
    assert crop.scale == (0.5, 1.0)
    assert moco_v2_augment((16, 16), ("crop",)).transforms[0].scale == (0.2, 1.0)


def test_augment_keeps_size_and_dtype():
    torch.manual_seed(0)
    aug = moco_v2_augment((16, 16))
    for channels in (1, 3):
        img = torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8)
        out = aug(img)
        assert out.shape == img.shape and out.dtype == torch.uint8
        assert to_input(out).dtype == torch.float32
