"""Supervised transfer with few labels: `ce`, `coin`, `bituning` and `linear` finetuning.

Public API (used by `unsupft transfer`, `unsupft evaluate` and the label stage):

    model = finetune(backbone, meta, images, labels, num_classes, method="ce", epochs=100, seed=0)
    predictions = predict(model, images)

`images` are uint8 [N, C, H, W] as `unsupft.data.load_arrays` returns them, `labels` long [N].
The returned `TransferModel` holds the finetuned `backbone` and a linear `fc`; the stage saves both
with `unsupft.models.save_model`. Methods (DESIGN.md, "transfer"):
- `ce`: a new linear classifier at lr 3.0 over the backbone at lr 1e-4, SGD with momentum 0.9, no
  weight decay (the few-shot protocol of the seeds), cosine decay over the run, random crop +
  horizontal flip;
- `coin`: SupCon (tau 0.3) on a projector head over two views for the first `coin_alpha * epochs`
  epochs, then CE + 0.1 * SupCon; the total number of epochs is unchanged;
- `bituning`: CE + Bi-tuning's contrastive cross-entropy on the classifier head + its categorical
  contrastive loss on a 128-d projector head, against per-class queues of momentum-encoder keys
  (`queue_per_class` keys per class, momentum 0.999, tau 0.07, loss weights 1). The queues start
  filled with the key encoder's features of the training images of each class, so that few-shot
  runs do not spend their short training contrasting against random vectors;
- `linear`: frozen backbone with BatchNorm in eval mode, only the classifier trains.
Projector heads train at `lr_projector` (0.1): lr 3.0 would blow up their unnormalised hidden
layer and 1e-4 would leave them random within a few-shot run.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unsupft import losses, store
from unsupft.errors import UserError
from unsupft.eval.features import default_device, preprocess

METHODS = ("ce", "coin", "bituning", "linear")
COIN_SUPCON_WEIGHT = 0.1


class TransferModel(nn.Module):
    """A backbone plus a linear classifier; `forward` takes preprocessed images, returns logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: Sequence[int] | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_dim, num_classes)
        self.image_size = list(image_size) if image_size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def projector(in_dim: int, out_dim: int = 128) -> nn.Module:
    """The MLP head that contrastive losses act on (features for the classifier stay untouched)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad by 1/8 of the size, reflect) + horizontal flip, per image, seeded."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


class PerClassQueues:
    """Bi-tuning's key queues: for each class a FIFO of `size` normalised key vectors per head."""

    def __init__(self, num_classes: int, size: int, dims: dict[str, int], device: torch.device) -> None:
        self.size = size
        self.keys = {name: torch.zeros(num_classes, size, d, device=device) for name, d in dims.items()}
        self.pointer = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def push(self, labels: torch.Tensor, **keys: torch.Tensor) -> None:
        for i, c in enumerate(labels.tolist()):
            slot = int(self.pointer[c])
            for name, value in keys.items():
                self.keys[name][c, slot] = value[i]
            self.pointer[c] = (slot + 1) % self.size


def _bias_augmented(features: torch.Tensor) -> torch.Tensor:
    """[h | 1], L2-normalised: the classifier's bias takes part in Bi-tuning's CE as a weight."""
    ones = torch.ones(len(features), 1, device=features.device, dtype=features.dtype)
    return F.normalize(torch.cat([features, ones], dim=1), dim=1)


def _param_groups(model: TransferModel, heads: list[nn.Module], method: str, lr_head: float,
                  lr_backbone: float, lr_projector: float) -> list[dict[str, Any]]:
    groups = [{"params": list(model.fc.parameters()), "lr": lr_head}]
    if method != "linear":
        groups.append({"params": list(model.backbone.parameters()), "lr": lr_backbone})
    for head in heads:
        groups.append({"params": list(head.parameters()), "lr": lr_projector})
    return groups


def finetune(
    backbone: nn.Module,
    meta: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    method: str = "ce",
    epochs: int = 100,
    seed: int = 0,
    out: str | None = None,
    *,
    batch_size: int = 64,
    coin_alpha: float = 0.7,
    lr_head: float = 3.0,
    lr_backbone: float = 1e-4,
    lr_projector: float = 0.1,
    queue_per_class: int = 16,
    momentum: float = 0.999,
    device: torch.device | None = None,
) -> TransferModel:
    """Finetune `backbone` (modified in place, and returned inside the model) on labeled images.

    `meta` is the dict `load_backbone` returns (its `image_size` decides the input size; None keeps
    the images' size). `images` uint8 [N, C, H, W], `labels` long [N] in [0, num_classes).
    `epochs` full passes over the images in shuffled batches of `batch_size`; everything random
    (classifier init, order, augmentation) follows `seed`. When `out` is given, one JSON line per
    epoch (epoch, step, loss and its parts, train accuracy) goes to `<out>/metrics.jsonl`.
    Returns the `TransferModel` in eval mode on the CPU.
    """
    if method not in METHODS:
        raise UserError(f"unknown --method '{method}' (choose from {', '.join(METHODS)})")
    if len(images) == 0:
        raise UserError("no labeled images to finetune on")
    device = device or default_device()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TransferModel(backbone, num_classes, meta.get("image_size")).to(device)
    x_all = preprocess(images, model.image_size)
    y_all = labels.long()
    out_dim = backbone.out_dim

    heads: list[nn.Module] = []
    if method in ("coin", "bituning"):
        proj = projector(out_dim).to(device)
        heads.append(proj)
    if method == "linear":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(
        _param_groups(model, heads, method, lr_head, lr_backbone, lr_projector), momentum=0.9, weight_decay=0.0
    )

    if method == "bituning":
        key_backbone = copy.deepcopy(model.backbone).requires_grad_(False)
        key_proj = copy.deepcopy(proj).requires_grad_(False)
        queues = PerClassQueues(num_classes, queue_per_class, {"h": out_dim + 1, "z": 128}, device)
        with torch.no_grad():  # start each class's queue with its own training images' keys
            key_backbone.eval()
            h = key_backbone(x_all.to(device))
            z = F.normalize(key_proj(h), dim=1)
            for _ in range(math.ceil(queue_per_class / max(1, int(torch.bincount(y_all).min())))):
                queues.push(y_all, h=_bias_augmented(h), z=z)
            key_backbone.train()

    def momentum_update() -> None:
        with torch.no_grad():
            for online, key in ((model.backbone, key_backbone), (proj, key_proj)):
                for p, k in zip(online.parameters(), key.parameters()):
                    k.mul_(momentum).add_(p.detach(), alpha=1 - momentum)
                for b, kb in zip(online.buffers(), key.buffers()):
                    kb.copy_(b)

    steps_per_epoch = math.ceil(len(x_all) / batch_size)
    # Cosine decay to 0 over the run: lr 3.0 on a fresh classifier overshoots at first, and the
    # decay lets a short few-shot run settle instead of ending on a large step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, epochs * steps_per_epoch) / (epochs * steps_per_epoch))))
    contrastive_epochs = int(round(coin_alpha * epochs)) if method == "coin" else 0
    history: list[dict[str, Any]] = []
    step = 0
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(epochs):
        model.train()
        for head in heads:
            head.train()
        if method == "linear":
            model.backbone.eval()
        order = torch.randperm(len(x_all), generator=generator)
        sums: dict[str, float] = {}
        correct = seen = 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            y = y_all[idx].to(device)
            view = augment(x_all[idx], generator).to(device)
            parts: dict[str, torch.Tensor] = {}
            with torch.autocast(**autocast):
                if method == "coin":
                    other = augment(x_all[idx], generator).to(device)
                    feats = model.backbone(torch.cat([view, other]))
                    z = F.normalize(proj(feats).float(), dim=1)
                    parts["supcon"] = losses.supcon_loss(z, torch.cat([y, y]), tau=0.3)
                    logits = model.fc(feats[: len(y)]).float()
                    if epoch >= contrastive_epochs:
                        parts["ce"] = F.cross_entropy(logits, y)
                        parts["supcon"] = COIN_SUPCON_WEIGHT * parts["supcon"]
                elif method == "bituning":
                    key_view = augment(x_all[idx], generator).to(device)
                    feats = model.backbone(view).float()
                    logits = model.fc(feats).float()
                    z_q = F.normalize(proj(feats).float(), dim=1)
                    momentum_update()
                    with torch.no_grad():
                        h_k = key_backbone(key_view).float()
                        z_k = F.normalize(key_proj(h_k).float(), dim=1)
                    weights = F.normalize(torch.cat([model.fc.weight, model.fc.bias[:, None]], dim=1), dim=1)
                    parts["ce"] = F.cross_entropy(logits, y)
                    parts["contrastive_ce"] = losses.bituning_contrastive_ce(
                        _bias_augmented(feats), weights.detach().float(), y, queues.keys["h"], tau=0.07)
                    parts["categorical"] = losses.bituning_categorical_contrastive(
                        z_q, z_k, y, queues.keys["z"], tau=0.07)
                else:
                    logits = model(view).float()
                    parts["ce"] = F.cross_entropy(logits, y)
            loss = sum(parts.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if method == "bituning":
                queues.push(y, h=_bias_augmented(h_k), z=z_k)
            step += 1
            n = len(y)
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
        if not math.isfinite(sums["loss"]):
            raise UserError(f"finetuning diverged at epoch {epoch} (loss {sums['loss']}); lower the learning rates")
        history.append({"epoch": epoch, "step": step, "method": method,
                        **{k: round(v / seen, 6) for k, v in sums.items()}, "train_top1": round(correct / seen, 6)})
    if out is not None:
        store.write_text(store.join(out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    if method == "linear":
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    return model.cpu().eval()


@torch.no_grad()
def predict(model: TransferModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids [N] for uint8 images [N, C, H, W] (eval mode, same preprocessing)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start:start + batch_size], model.image_size).to(device)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
