"""`unsupft semi`: FixMatch from any `--init` on few labeled and many unlabeled target images.

The question the papers' FixMatch tables answer (Unsupervised Finetuning, Table 5; Improve
Unsupervised Pretraining for Few-label Transfer, Table 6): with K labels per class *and* the
unlabeled target, how good a model does each initialisation give? Each step trains on a labeled
batch of B (weakly augmented) and mu*B unlabeled images seen twice, weakly (flip + crop) and
strongly (flip + crop, torchvision's RandAugment, Cutout); the weak view's confident predictions
are hard pseudo labels for the strong view (`unsupft.losses.fixmatch_loss`). An exponential moving
average (EMA) of the weights is what is evaluated and saved, as in FixMatch.

Data: the labeled draw (`--shots`, `--labels`, as `transfer`) is small and decoded once; the
unlabeled set is read sample by sample in DataLoader workers (`unsupft.data.samples`), never whole.
Both streams are `LoaderBatches`, so step s always sees the same images and augmentations and a
killed run resumes exactly (the one loop, `unsupft.train.loop`: checkpoint, DDP, bf16, progress).
With `--unlabeled-weight 0` the unlabeled set is not read at all (supervised training with the
same recipe): metrics then have no `unlabeled` and no `pseudo_label_rate`.

Outputs: `config.json`, `metrics.jsonl` (loss, ce, unlabeled, pseudo_label_rate, train_top1),
`checkpoint.pt`, `train_keys.txt`, `model.pt` (the EMA backbone + classifier + classes, loadable by
`unsupft.models.load`), `_DONE.json` (with `--test`: `test_top1` of the EMA model and
`test_top1_raw` of the trained weights themselves).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import click
import torch
from torch import nn

import unsupft._torchvision  # noqa: F401  (must precede torchvision imports)
from torchvision.transforms import v2

from unsupft import distributed, losses, options, stage, store
from unsupft.preprocess import to_input
from unsupft.data.samples import Fitted, default_workers, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval.classifier import align_test_labels, score_classifier
from unsupft.eval.fewshot import select_training_set
from unsupft.models import ARCHS, load_backbone
from unsupft.models.io import describe
from unsupft.models.heads import momentum_update
from unsupft.seeding import mix_seed, seed_everything
from unsupft.train.batches import MIN_BN_BATCH, LoaderBatches, require_bn_batch
from unsupft.train.loop import LoopConfig, TrainTask, train, unwrap
from unsupft.train.transfer import TransferModel, save_finetuned

EMA_WARMUP = 10  # the n-th EMA update decays by min(decay, n / (EMA_WARMUP - 1 + n)): short runs forget the init


def weak_augment(size: Sequence[int]) -> v2.Compose:
    """FixMatch's weak view of a uint8 [C, H, W] image: a crop from the image padded by 1/8 of its
    side (reflected, as `transfer` does) and a horizontal flip."""
    height = int(size[0])
    return v2.Compose([v2.RandomCrop([int(s) for s in size], padding=max(1, height // 8), padding_mode="reflect"),
                       v2.RandomHorizontalFlip()])


def strong_augment(size: Sequence[int]) -> v2.Compose:
    """FixMatch's strong view: the weak view, then RandAugment (torchvision's: 2 random operations
    at magnitude 9 of 31) and Cutout (a grey square of up to half the side, always applied)."""
    return v2.Compose([weak_augment(size), v2.RandAugment(),
                       v2.RandomErasing(p=1.0, scale=(0.01, 0.25), ratio=(1.0, 1.0), value=127)])


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """`ema <- decay * ema + (1 - decay) * model` for the parameters (the one momentum rule,
    `unsupft.models.heads`); buffers (BatchNorm statistics) are copied, as FixMatch's reference code
    does: unlike MoCo's key encoder, the EMA model never runs a training forward pass, so it has no
    statistics of its own to keep."""
    momentum_update([model], [ema], decay)
    for average, buffer in zip(ema.buffers(), model.buffers()):
        average.copy_(buffer)


class SemiModel(nn.Module):
    """What the loop trains and checkpoints: the classifier `model` and its EMA copy `ema`, which
    does not train (its weights follow `model`'s through `ema_update`) and stays in eval mode."""

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> "SemiModel":
        super().train(mode)
        self.ema.eval()
        return self


class FixMatchTask(TrainTask):
    """One FixMatch step: labeled, weak and strong views through the model in one forward (one set
    of BatchNorm statistics for all three, as FixMatch's interleaving intends).

    The EMA is brought up to date at the start of each step with the weights the previous step left
    (the loop owns the optimizer step), so it is a function of the checkpointed weights and resumes
    exactly; `finish` applies the last step's update.
    """

    def __init__(self, model: TransferModel, config: SemiConfig) -> None:
        self.model, self.config = SemiModel(model), config

    def param_groups(self) -> list[dict[str, Any]]:
        m = unwrap(self.model).model
        return [{"params": list(m.fc.parameters()), "lr": self.config.lr_head},
                {"params": list(m.backbone.parameters()), "lr": self.config.lr_backbone}]

    def update_ema(self, updates: int) -> None:
        """The EMA step after `updates` optimizer steps (warm-up: early averages forget the init)."""
        m = unwrap(self.model)
        ema_update(m.ema, m.model, min(self.config.ema_decay, updates / (EMA_WARMUP - 1 + updates)))

    def finish(self, steps: int) -> TransferModel:
        """The EMA model after the run's `steps` steps, on the CPU in eval mode."""
        self.update_ema(steps)
        return unwrap(self.model).ema.cpu().eval()

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if step > 0:
            self.update_ema(step)
        if self.config.unlabeled_weight == 0:
            images, labels = batch
            logits = self.model(images).float()
            loss = nn.functional.cross_entropy(logits, labels)
            return loss, {"ce": loss, "train_top1": (logits.argmax(1) == labels).float().mean()}
        (images, labels), (weak, strong) = batch
        logits = self.model(torch.cat([images, weak, strong])).float()
        labeled, weak_logits, strong_logits = logits.split([len(images), len(weak), len(strong)])
        parts = losses.fixmatch_loss(labeled, labels, weak_logits, strong_logits, self.config.threshold,
                                     self.config.unlabeled_weight)
        return parts.total, {"ce": parts.supervised, "unlabeled": parts.unlabeled,
                             "pseudo_label_rate": parts.mask.mean(),
                             "train_top1": (labeled.argmax(1) == labels).float().mean()}


class PairedBatches:
    """Two batch sources stepped together (step s: batch s of each); the loop's `BatchSource`.
    Progress counts epochs of the second (the unlabeled stream)."""

    def __init__(self, first: LoaderBatches, second: LoaderBatches) -> None:
        self.first, self.second = first, second
        self.samples_per_epoch, self.batch_size = second.samples_per_epoch, second.batch_size

    def batches(self, start_step: int, steps: int, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        return zip(self.first.batches(start_step, steps, rank, world_size),
                   self.second.batches(start_step, steps, rank, world_size))


@dataclass(frozen=True, kw_only=True)
class SemiConfig(stage.StageOptions):
    init: str = options.option(help="Stage output URI or checkpoint file (model.pt, moco.pt, torchvision state_dict).")
    train: str = options.option(help="Labeled training data set URI.")
    unlabeled: str = options.option(help="Unlabeled target data set URI (read image by image).")
    test: str | None = options.option(None, help="Labeled test data set: the EMA model's accuracy goes to _DONE.json.")
    shots: int | None = options.option(None, type=options.count(1, 100_000), help="Draw exactly K labeled images per class.")
    labels: str | None = options.option(
        None, help="CSV/text list of keys to train on (optional header key,label; labels override the shards').")
    seed: int = options.option(0, type=options.SEED, help="Seed of the draw, init, order and augmentation.")
    threshold: float = options.option(0.95, type=options.number(0, 1, min_open=True),
                                      help="Confidence a weak view's prediction needs to become a pseudo label.")
    mu: int = options.option(7, type=options.count(1, 1024), help="Unlabeled images per labeled image in a step.")
    unlabeled_weight: float = options.option(1.0, type=options.number(0, 1000),
                                             help="Weight of the unlabeled loss (0: supervised only, --unlabeled is not read).")
    ema_decay: float = options.option(0.999, type=options.number(0, 1, max_open=True),
                                      help="Decay of the weights' moving average that is evaluated and saved.")
    steps: int = options.option(1000, type=options.STEPS)
    batch_size: int = options.option(
        64, type=options.BATCH,
        help="Labeled images per step, all processes (at most the labeled set's size); mu times as many unlabeled.")
    lr_head: float = options.option(3.0, type=options.LEARNING_RATE, help="Learning rate of the new classifier.")
    lr_backbone: float = options.option(1e-4, type=options.LEARNING_RATE)
    arch: str | None = options.option(None, type=click.Choice(ARCHS), help="Architecture of a plain torchvision --init.")
    checkpoint_every: int = options.option(200, type=options.count(0, 100_000_000), hashed=False)
    amp: str = options.option("auto", type=click.Choice(["auto", "bf16", "off"]))
    workers: int | None = options.option(None, type=options.count(0, 64), hashed=False,
                                         help="DataLoader workers (default: half the cores).")
    out: str = options.option(help="Output URI.", hashed=False)


@click.command("semi")
@options.options_from(SemiConfig)
@report_user_errors
def semi_command(config: SemiConfig) -> None:
    """FixMatch from --init: few labeled --train images plus the unlabeled --unlabeled set."""
    inputs = {"init": config.init, "train": config.train, "labels": config.labels, "test": config.test,
              "unlabeled": config.unlabeled if config.unlabeled_weight > 0 else None}
    run = stage.start("semi", store.normalize(config.out), config.identity(), inputs=inputs)
    if run is None:
        return
    data = open_samples(config.train)
    unlabeled = open_samples(config.unlabeled, data.channels)
    if len(unlabeled) == 0:
        raise UserError(f"{config.unlabeled}: no images")
    test = open_samples(config.test, data.channels) if config.test is not None else None
    test_labels = align_test_labels(data, test) if test is not None else None
    indices, labels = select_training_set(data, config.shots, config.seed, config.labels)
    if len(indices) == 0:
        raise UserError(f"{config.train}: no labeled images to train on")
    backbone, meta = load_backbone(config.init, arch=config.arch, in_channels=data.channels)
    size = image_size_of(data, meta.get("image_size"), "give an --init with a recorded image size")
    if config.unlabeled_weight == 0:  # else BatchNorm also sees the batch's 2*mu unlabeled views
        require_bn_batch(config.batch_size, distributed.env_dist().world_size)
    # one labeled image: two views of it
    per_rank = min(distributed.per_rank_batch(config.batch_size), max(len(indices), MIN_BN_BATCH))
    workers = default_workers() if config.workers is None else config.workers

    main = distributed.env_dist().is_main
    if main:
        run.claim(image_size=size)
        click.echo(f"init: {describe(meta)}", err=True)
    seed_everything(config.seed)
    task = FixMatchTask(TransferModel(backbone, len(data.classes), size), config)
    weak, strong = weak_augment(size), strong_augment(size)
    labeled_images, unlabeled_images = subset(data, size, indices), Fitted(unlabeled, size)

    def two_views(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An unlabeled image's weak and strong views as backbone input."""
        image = unlabeled_images[i]
        return to_input(weak(image)), to_input(strong(image))

    source: Any = LoaderBatches(lambda i: (to_input(weak(labeled_images[i])), labels[i]), len(indices), per_rank,
                                config.seed, num_workers=0 if isinstance(labeled_images, torch.Tensor) else workers)
    if config.unlabeled_weight > 0:
        source = PairedBatches(source, LoaderBatches(two_views, len(unlabeled), config.mu * per_rank,
                                                     mix_seed(config.seed, 1), num_workers=workers))
    loop = LoopConfig(out=run.out, steps=config.steps, lr=config.lr_head, schedule="cosine", momentum=0.9,
                      weight_decay=0.0, checkpoint_every=config.checkpoint_every,
                      log_every=min(50, max(1, config.checkpoint_every)), seed=config.seed, amp=config.amp)
    result = train(task, source, loop)
    model = task.finish(config.steps)
    if not main:
        return
    final: dict[str, Any] = dict(result.metrics)
    if test is not None and test_labels is not None:
        test_images, truth = Fitted(test, size), test_labels.numpy()
        for name, scored in (("test_top1", model), ("test_top1_raw", unwrap(task.model).model.cpu())):
            final[name] = score_classifier(scored, test_images, truth, data.classes,
                                           batch_size=config.batch_size)["top1"]
    save_finetuned(run.out, model, meta, data, indices)
    run.finish(trained_on=int(len(indices)),
               unlabeled_images=len(unlabeled) if config.unlabeled_weight > 0 else 0, final_metrics=final)
    shown = {k: round(v, 4) for k, v in final.items() if k in ("pseudo_label_rate", "test_top1", "test_top1_raw")}
    click.echo(f"{run.out}: FixMatch on {len(indices)} labeled images" + (f", {shown}" if shown else ""), err=True)
