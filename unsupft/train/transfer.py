"""Supervised transfer with few labels: `ce`, `coin`, `bituning` and `linear` finetuning.

Public API (used by `unsupft transfer`, `unsupft evaluate` and the label stage):

    model = finetune(backbone, meta, images, labels, num_classes, FinetuneConfig(method="ce", epochs=100, seed=0))
    predictions = predict(model, images)

`images` are uint8 [N, C, H, W]: a tensor, or a lazy view (`unsupft.data.samples.Fitted`) read
per sample in the DataLoader workers; `labels` long [N].
The returned `TransferModel` holds the finetuned `backbone` and a linear `fc`; the stage saves both
with `unsupft.models.save_model`. Training runs in the one loop, `unsupft.train.loop.train`
(checkpoint/resume, metrics, device, AMP), over `LoaderBatches` (seeded per-sample augmentation).
Each method is a `TransferMethod` (the loop's `TrainTask`), registered by name in `METHODS`, which
the `--method` choices come from:
- `ce`: a new linear classifier at lr 3.0 over the backbone at lr 1e-4, SGD with momentum 0.9, no
  weight decay (the few-shot protocol of the seeds), cosine decay over the run, random crop +
  horizontal flip;
- `coin`: SupCon (tau 0.3) on a projector head over two views for the first `coin_alpha * epochs`
  epochs, then CE + 0.1 * SupCon with the cosine schedule restarted; the total number of epochs is
  unchanged;
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

import contextlib
import copy
import math
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from unsupft import losses, store
from unsupft.data.samples import Samples, batches_of, default_workers
from unsupft.errors import UserError
from unsupft.models import save_model
from unsupft.models.features import extract_features
from unsupft.models.heads import momentum_update, projection_head
from unsupft.preprocess import preprocess
from unsupft.train.batches import MIN_BN_BATCH, LoaderBatches, require_bn_batch
from unsupft.train.loop import LoopConfig, TrainTask, train, unwrap
from unsupft.seeding import seed_everything

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


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop (pad by 1/8 of the size, reflect) + horizontal flip of one image [C, H, W].

    Draws from the global torch RNG, which `LoaderBatches` seeds per sample (resumable, seeded).
    """
    _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x[None], (pad, pad, pad, pad), mode="reflect")[0]
    dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    crop = padded[:, dy:dy + h, dx:dx + w]
    return crop.flip(-1) if bool(torch.rand(()) < 0.5) else crop


class PerClassQueues:
    """Bi-tuning's key queues: for each class a FIFO of `size` normalised key vectors per head."""

    def __init__(self, num_classes: int, size: int, dims: dict[str, int]) -> None:
        self.size = size
        self.keys = {name: torch.zeros(num_classes, size, d) for name, d in dims.items()}
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


@dataclass(frozen=True)
class FinetuneConfig:
    """How `finetune` trains: the method, the run's length, batch and seed, the learning rates, and
    COIN's/Bi-tuning's own settings (see the module docstring). `unsupft transfer` defaults to these."""

    method: str = "ce"
    epochs: int = 100
    seed: int = 0
    batch_size: int = 64
    coin_alpha: float = 0.7
    lr_head: float = 3.0
    lr_backbone: float = 1e-4
    lr_projector: float = 0.1
    queue_per_class: int = 16
    momentum: float = 0.999


@dataclass(frozen=True)
class MethodConfig(FinetuneConfig):
    """What a method needs beyond the model: the finetuning settings and the run's epoch in steps."""

    steps_per_epoch: int = 1


class _Finetuned(nn.Module):
    """What the loop trains and checkpoints: the model, its projector and Bi-tuning's key encoders.

    `forward` returns backbone features. With a frozen backbone (`linear`), `train()` keeps its
    BatchNorm in eval mode.
    """

    def __init__(self, model: TransferModel, heads: nn.ModuleDict, frozen_backbone: bool) -> None:
        super().__init__()
        self.model, self.heads, self.frozen_backbone = model, heads, frozen_backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.backbone(x)

    def train(self, mode: bool = True) -> "_Finetuned":
        super().train(mode)
        if self.frozen_backbone:
            self.model.backbone.eval()
        return self


class TransferMethod(TrainTask):
    """What every method shares: the classifier at `lr_head` over the backbone at `lr_backbone`
    (a projector, when a method adds one, at `lr_projector`), and the CE step on one view.

    A method says how many augmented `views` of an image a batch holds, may add `heads` (built in
    that order after the classifier, so seeds give the same weights) and its own `training_step`.
    """

    views = 1
    frozen_backbone = False

    def __init__(self, model: TransferModel, config: MethodConfig, images: Dataset | torch.Tensor,
                 labels: torch.Tensor) -> None:
        self.config = config
        if self.frozen_backbone:
            model.backbone.requires_grad_(False)
        self.model = _Finetuned(model, self.heads(model, images, labels), self.frozen_backbone)

    def heads(self, model: TransferModel, images: Dataset | torch.Tensor, labels: torch.Tensor) -> nn.ModuleDict:
        """Modules trained or carried besides the model (none for plain CE)."""
        return nn.ModuleDict()

    def restarts(self) -> tuple[int, ...]:
        """Steps where the method starts a new phase with the lr schedule restarted (none)."""
        return ()

    def param_groups(self) -> list[dict[str, Any]]:
        m = unwrap(self.model)
        groups = [{"params": list(m.model.fc.parameters()), "lr": self.config.lr_head}]
        if not self.frozen_backbone:
            groups.append({"params": list(m.model.backbone.parameters()), "lr": self.config.lr_backbone})
        if "proj" in m.heads:
            groups.append({"params": list(m.heads["proj"].parameters()), "lr": self.config.lr_projector})
        return groups

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        view, y = batch
        logits = unwrap(self.model).model.fc(self.model(view)).float()
        return self.result({"ce": F.cross_entropy(logits, y)}, logits, y)

    @staticmethod
    def result(parts: dict[str, torch.Tensor], logits: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss (the sum of its parts) and what the loop logs: the parts and train accuracy."""
        return sum(parts.values()), {**parts, "train_top1": (logits.argmax(1) == y).float().mean()}

    def release(self) -> None:
        """Leave the backbone as it came in (trainable) once training is over."""
        if self.frozen_backbone:
            unwrap(self.model).model.backbone.requires_grad_(True)


class CrossEntropy(TransferMethod):
    """`ce`: the whole network finetuned with cross-entropy (the base method as it is)."""


class Linear(TransferMethod):
    """`linear`: the backbone frozen (BatchNorm in eval mode), only the classifier trains."""

    frozen_backbone = True


class Coin(TransferMethod):
    """`coin`: SupCon on a projector over two views for the first `coin_alpha` of the epochs, then
    CE + `COIN_SUPCON_WEIGHT` * SupCon. The CE phase restarts the cosine schedule: under one
    schedule over both phases the new classifier would only start training once the lr had decayed
    below ~20% of its peak (alpha 0.7), and end under-trained (BENCHMARKS.md, COIN)."""

    views = 2

    def ce_phase_start(self) -> int:
        return int(round(self.config.coin_alpha * self.config.epochs)) * self.config.steps_per_epoch

    def restarts(self) -> tuple[int, ...]:
        return (self.ce_phase_start(),)

    def heads(self, model: TransferModel, images: Dataset | torch.Tensor, labels: torch.Tensor) -> nn.ModuleDict:
        return nn.ModuleDict({"proj": projection_head(model.backbone.out_dim)})

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        m = unwrap(self.model)
        view, other, y = batch
        feats = self.model(torch.cat([view, other]))
        z = F.normalize(m.heads["proj"](feats).float(), dim=1)
        parts = {"supcon": losses.supcon_loss(z, torch.cat([y, y]), tau=0.3)}
        logits = m.model.fc(feats[: len(y)]).float()
        if step >= self.ce_phase_start():
            parts["ce"] = F.cross_entropy(logits, y)
            parts["supcon"] = COIN_SUPCON_WEIGHT * parts["supcon"]
        return self.result(parts, logits, y)


class BiTuning(TransferMethod):
    """`bituning`: CE + contrastive CE on the classifier + categorical contrastive loss on a
    projector, against per-class queues of a momentum key encoder's features."""

    views = 2

    def heads(self, model: TransferModel, images: Dataset | torch.Tensor, labels: torch.Tensor) -> nn.ModuleDict:
        proj = projection_head(model.backbone.out_dim)
        heads = nn.ModuleDict({"proj": proj, "key_backbone": copy.deepcopy(model.backbone).requires_grad_(False),
                               "key_proj": copy.deepcopy(proj).requires_grad_(False)})
        size = self.config.queue_per_class
        self.queues = PerClassQueues(int(model.fc.out_features), size, {"h": model.backbone.out_dim + 1, "z": 128})
        with torch.no_grad():  # start each class's queue with its own training images' keys
            h = extract_features(heads["key_backbone"], images, image_size=model.image_size,
                                 device=torch.device("cpu"))
            z = F.normalize(heads["key_proj"](h), dim=1)
            for _ in range(math.ceil(size / max(1, int(torch.bincount(labels).min())))):
                self.queues.push(labels, h=_bias_augmented(h), z=z)
        return heads

    def extra_state(self) -> dict[str, Any]:
        return {"queue_keys": {k: v.cpu() for k, v in self.queues.keys.items()}, "queue_pointer": self.queues.pointer}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state:
            self.queues.keys = {k: v.clone() for k, v in state["queue_keys"].items()}
            self.queues.pointer = state["queue_pointer"].clone()

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        m = unwrap(self.model)
        view, key_view, y = batch
        for name, keys in self.queues.keys.items():
            self.queues.keys[name] = keys.to(self.device)
        feats = self.model(view).float()
        logits = m.model.fc(feats).float()
        z_q = F.normalize(m.heads["proj"](feats).float(), dim=1)
        momentum_update((m.model.backbone, m.heads["proj"]), (m.heads["key_backbone"], m.heads["key_proj"]),
                        self.config.momentum)
        with torch.no_grad():
            h_k = m.heads["key_backbone"](key_view).float()
            z_k = F.normalize(m.heads["key_proj"](h_k).float(), dim=1)
        fc = m.model.fc
        weights = F.normalize(torch.cat([fc.weight, fc.bias[:, None]], dim=1), dim=1)
        # clones: the queues change below, before the loop runs backward through these losses
        parts = {
            "ce": F.cross_entropy(logits, y),
            "contrastive_ce": losses.bituning_contrastive_ce(
                _bias_augmented(feats), weights.detach().float(), y, self.queues.keys["h"].clone(), tau=0.07),
            "categorical": losses.bituning_categorical_contrastive(
                z_q, z_k, y, self.queues.keys["z"].clone(), tau=0.07),
        }
        self.queues.push(y, h=_bias_augmented(h_k), z=z_k)
        return self.result(parts, logits, y)


METHODS: dict[str, type[TransferMethod]] = {"ce": CrossEntropy, "coin": Coin, "bituning": BiTuning, "linear": Linear}


def check_batch(config: FinetuneConfig) -> None:
    """Refuse `config.batch_size` when BatchNorm cannot train on it (`require_bn_batch`), unless the
    method keeps the backbone frozen (`linear`): stages call it before they write anything."""
    if not METHODS[config.method].frozen_backbone:
        require_bn_batch(config.batch_size)


def finetune(backbone: nn.Module, meta: dict[str, Any], images: Dataset | torch.Tensor, labels: torch.Tensor,
             num_classes: int, config: FinetuneConfig = FinetuneConfig(), out: str | None = None) -> TransferModel:
    """Finetune `backbone` (modified in place, and returned inside the model) on labeled images.

    `meta` is the dict `load_backbone` returns (its `image_size` decides the input size; None keeps
    the images' size). `images` uint8 [N, C, H, W] (in memory or lazy), `labels` long [N] in [0, num_classes).
    `config.epochs` passes of `ceil(N / batch_size)` steps over the images in shuffled batches of
    `min(batch_size, max(N, MIN_BN_BATCH))` (a single labeled image is seen in two augmentations per
    batch: BatchNorm cannot train on one image, and `check_batch` refuses a `batch_size` of one
    unless the backbone is frozen); everything random (classifier init, order, augmentation)
    follows `config.seed`.
    Training runs in the one loop (`unsupft.train.loop.train`) on its device. When `out` is given,
    `<out>/checkpoint.pt` (every epoch; a rerun resumes from it) and `<out>/metrics.jsonl` (one line per epoch:
    step, lr, loss and its parts and train accuracy of the epoch's last batch) are written there.
    Returns the `TransferModel` in eval mode on the CPU.
    """
    if len(images) == 0:
        raise UserError("no labeled images to finetune on")
    check_batch(config)
    seed_everything(config.seed)
    model = TransferModel(backbone, num_classes, meta.get("image_size"))
    labels = labels.long()
    batch = min(config.batch_size, max(len(images), MIN_BN_BATCH))
    steps_per_epoch = math.ceil(len(images) / batch)
    method_config = MethodConfig(**asdict(config), steps_per_epoch=steps_per_epoch)
    task = METHODS[config.method](model, method_config, images, labels)

    def sample(i: int) -> tuple[torch.Tensor, ...]:
        x = preprocess(images[i][None], model.image_size)[0]
        return (*(augment(x) for _ in range(task.views)), labels[i])

    workers = 0 if isinstance(images, torch.Tensor) else default_workers()
    data = LoaderBatches(sample, len(images), batch_size=batch, seed=config.seed, num_workers=workers)
    # Cosine decay to 0 over the run: lr 3.0 on a fresh classifier overshoots at first, and the
    # decay lets a short few-shot run settle instead of ending on a large step.
    with tempfile.TemporaryDirectory() if out is None else contextlib.nullcontext(out) as target:
        train(task, data, LoopConfig(
            out=target, steps=config.epochs * steps_per_epoch, lr=config.lr_head, schedule="cosine",
            restarts=task.restarts(), momentum=0.9, weight_decay=0.0, log_every=steps_per_epoch, seed=config.seed,
            checkpoint_every=steps_per_epoch if out is not None else 0,
            progress=False if out is None else None, tensorboard=out is not None))
    task.release()
    return model.cpu().eval()


def save_finetuned(out: str, model: TransferModel, meta: dict[str, Any], data: Samples, indices: Sequence[int]) -> None:
    """A finetuning stage's last files in `out`: `train_keys.txt` (the keys trained on, for
    reproducibility), then `model.pt` (backbone + classifier + classes, at the model's input size)."""
    store.write_text(store.join(out, "train_keys.txt"), "".join(data.key(int(i)) + "\n" for i in indices))
    save_model(store.join(out, "model.pt"), model.backbone, meta["arch"], meta["in_channels"], model.image_size,
               classifier=model.fc, classes=list(data.classes))


@torch.no_grad()
def predict(model: TransferModel, images: Dataset | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ids [N] for uint8 images [N, C, H, W], in memory or lazy (eval mode, same
    preprocessing), read batch by batch."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for batch in batches_of(images, batch_size):
        x = preprocess(batch, model.image_size).to(device)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
