"""MoCo v2 (He et al. 2020; Chen et al. 2020): query/key encoders, momentum update, key queue.

One `forward` does a whole training step's model work, so that under DDP gradients synchronise
through the wrapper:
1. the key encoder moves towards the query encoder (momentum `m`) *before* the keys are computed,
   so the keys come from this step's key encoder (as in facebookresearch/moco);
2. queries and keys are computed; keys without gradient, with BatchNorm statistics that do not
   leak between a query and its key: under DDP by shuffle-BN (keys are shuffled across ranks before
   the key encoder and unshuffled after), on one process by splitting the batch (queries and the
   shuffled keys each run in `bn_splits` groups, so a key's BN statistics come from other images
   than its query's) -- a shuffle alone does nothing on one process;
3. the InfoNCE loss against the queue, plus, when a mixed query is given, the mixed-query loss;
4. the keys of every rank are enqueued *after* the logits (the current keys are not negatives of
   themselves). Any batch size works: the queue wraps around.

State layout (`moco.pt`, see `save_moco`): `backbone.*` (torchvision names), `head.*`
(Linear-ReLU-Linear, the same layout as facebookresearch's `fc.0/fc.2`), `key_backbone.*`,
`key_head.*`, `queue` [K, dim], `queue_ptr`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from unsupft import checkpoint, distributed
from unsupft.losses import infonce_loss, mixed_query_loss, moco_logits
from unsupft.models.heads import momentum_update, projection_head
from unsupft.models.io import MOCO_FORMAT


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int = 128, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, bn_splits: int = 2) -> None:
        super().__init__()
        self.momentum, self.temperature, self.bn_splits = momentum, temperature, bn_splits
        self.backbone = backbone
        self.head = projection_head(backbone.out_dim, dim)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_head = copy.deepcopy(self.head)
        self.reset_key_encoder()
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def reset_key_encoder(self) -> None:
        """Key encoder := query encoder (at the start, and after loading new query weights)."""
        for query, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            key.load_state_dict(query.state_dict())
            key.requires_grad_(False)

    def momentum_update(self) -> None:
        """The key encoder follows the query encoder (`unsupft.models.heads`: parameters only)."""
        momentum_update((self.backbone, self.head), (self.key_backbone, self.key_head), self.momentum)

    def _in_splits(self, fn, x: torch.Tensor) -> torch.Tensor:
        if distributed.world_size() > 1 or self.bn_splits <= 1 or len(x) < 2 * self.bn_splits:
            return fn(x)
        return torch.cat([fn(chunk) for chunk in x.chunk(self.bn_splits)])

    def encode_query(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._in_splits(lambda x: self.head(self.backbone(x)), images), dim=1)

    @torch.no_grad()
    def encode_key(self, images: torch.Tensor) -> torch.Tensor:
        """Keys with shuffled BatchNorm batches (across ranks under DDP, split groups on one process)."""
        encode = lambda x: self.key_head(self.key_backbone(x))  # noqa: E731
        if distributed.world_size() > 1:
            return F.normalize(_shuffled_across_ranks(encode, images), dim=1)
        perm = torch.randperm(len(images), device=images.device)
        keys = torch.empty(len(images), self.queue.shape[1], device=images.device)
        keys[perm] = self._in_splits(encode, images[perm]).float()
        return F.normalize(keys, dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = distributed.all_gather(keys.float().contiguous())
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, mixed: torch.Tensor | None = None,
                mix_partner: torch.Tensor | None = None, lam: float | torch.Tensor = 1.0
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics of one step. `mixed[i]` mixes image i with image `mix_partner[i]`,
        holding a share `lam` of image i; its loss is added to the InfoNCE loss."""
        self.momentum_update()
        if mixed is None:
            q = self.encode_query(im_q)
        else:
            q, q_mixed = self.encode_query(torch.cat([im_q, mixed])).split(len(im_q))
        k = self.encode_key(im_k).to(q.dtype)
        queue = self.queue.clone().detach().to(q.dtype)
        loss = infonce_loss(q, k, queue, self.temperature)
        with torch.no_grad():
            logits = moco_logits(q, k, queue, self.temperature)
            metrics: dict[str, Any] = {"infonce": loss.detach(), "key_top1": (logits.argmax(1) == 0).float().mean()}
        if mixed is not None:
            mix_loss = mixed_query_loss(q_mixed, k, k[mix_partner], queue, lam, self.temperature)
            metrics["mix"] = mix_loss.detach()
            loss = loss + mix_loss
        self.enqueue(k)
        return loss, metrics


@torch.no_grad()
def _shuffled_across_ranks(encode, images: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN (facebookresearch/moco): encode a random cross-rank permutation of the global batch
    in per-rank pieces, and return this rank's rows in the original order."""
    gathered = distributed.all_gather(images)
    world, rank = distributed.world_size(), distributed.rank()
    perm = torch.randperm(len(gathered), device=images.device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    mine = perm.view(world, -1)[rank]
    keys = distributed.all_gather(encode(gathered[mine]).float())
    return keys[unshuffle.view(world, -1)[rank]]


def freeze_all_but_bn(moco: MoCo) -> None:
    """HPT-BN: of the query backbone only BatchNorm affine parameters train (the head trains too)."""
    for module in moco.backbone.modules():
        trainable = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters(recurse=False):
            p.requires_grad_(trainable)


def save_moco(uri: str, moco: MoCo, arch: str, in_channels: int, image_size: list[int] | tuple[int, int]) -> None:
    checkpoint.save(uri, {
        "format": MOCO_FORMAT, "arch": arch, "in_channels": int(in_channels),
        "image_size": [int(s) for s in image_size],
        "dim": moco.queue.shape[1], "queue_size": moco.queue.shape[0],
        "momentum": moco.momentum, "temperature": moco.temperature,
        "moco": {k: v.detach().cpu() for k, v in moco.state_dict().items()},
    })
