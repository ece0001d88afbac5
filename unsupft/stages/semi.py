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
from typing import Any, Callable, Iterator, Sequence

import click
import torch
from torch import nn

import unsupft._torchvision  # noqa: F401  (must precede torchvision imports)
from torchvision.transforms import v2

from unsupft import checkpoint, losses, options, stage, store
from unsupft.preprocess import to_input
from unsupft.data.samples import Fitted, default_workers, image_size_of, open_samples, subset
from unsupft.errors import UserError, report_user_errors
from unsupft.eval.classifier import score_classifier
from unsupft.stages.evaluate import align_test_labels
from unsupft.models import ARCHS, load_backbone, save_model
from unsupft.models.io import describe
from unsupft import distributed
from unsupft.models.heads import momentum_update
from unsupft.seeding import mix_seed, seed_everything
from unsupft.train.batches import LoaderBatches
from unsupft.train.loop import LoopConfig, TrainTask, train, unwrap
from unsupft.stages.moco_common import per_rank_batch
from unsupft.train.transfer import TransferModel
from unsupft.stages.transfer import select_training_set

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

    def __init__(self, model: TransferModel, threshold: float, unlabeled_weight: float, ema_decay: float,
                 lr_head: float, lr_backbone: float) -> None:
        self.model = SemiModel(model)
        self.threshold, self.unlabeled_weight, self.ema_decay = threshold, unlabeled_weight, ema_decay
        self.lr_head, self.lr_backbone = lr_head, lr_backbone

    def param_groups(self) -> list[dict[str, Any]]:
        m = unwrap(self.model).model
        return [{"params": list(m.fc.parameters()), "lr": self.lr_head},
                {"params": list(m.backbone.parameters()), "lr": self.lr_backbone}]

    def update_ema(self, updates: int) -> None:
        """The EMA step after `updates` optimizer steps (warm-up: early averages forget the init)."""
        m = unwrap(self.model)
        ema_update(m.ema, m.model, min(self.ema_decay, updates / (EMA_WARMUP - 1 + updates)))

    def finish(self, steps: int) -> TransferModel:
        """The EMA model after the run's `steps` steps, on the CPU in eval mode."""
        self.update_ema(steps)
        return unwrap(self.model).ema.cpu().eval()

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if step > 0:
            self.update_ema(step)
        if self.unlabeled_weight == 0:
            images, labels = batch
            logits = self.model(images).float()
            loss = nn.functional.cross_entropy(logits, labels)
            return loss, {"ce": loss, "train_top1": (logits.argmax(1) == labels).float().mean()}
        (images, labels), (weak, strong) = batch
        logits = self.model(torch.cat([images, weak, strong])).float()
        labeled, weak_logits, strong_logits = logits.split([len(images), len(weak), len(strong)])
        parts = losses.fixmatch_loss(labeled, labels, weak_logits, strong_logits, self.threshold,
                                     self.unlabeled_weight)
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


def _views(images: Any, augments: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[int], Any]:
    """Sample i -> its augmented views as backbone input (uint8 augmentation, then `to_input`)."""
    def sample(i: int) -> tuple[torch.Tensor, ...]:
        image = images[i]
        return tuple(to_input(augment(image)) for augment in augments)
    return sample


@click.command("semi")
@click.option("--init", required=True, help="Stage output URI or checkpoint file (model.pt, moco.pt, torchvision state_dict).")
@click.option("--train", "train_uri", required=True, help="Labeled training data set URI.")
@click.option("--unlabeled", "unlabeled_uri", required=True, help="Unlabeled target data set URI (read image by image).")
@click.option("--test", "test_uri", default=None, help="Labeled test data set: the EMA model's accuracy goes to _DONE.json.")
@click.option("--shots", type=options.count(1, 100_000), default=None, help="Draw exactly K labeled images per class.")
@click.option("--labels", "labels_file", default=None,
              help="CSV/text list of keys to train on (optional header key,label; labels override the shards').")
@click.option("--seed", type=options.SEED, default=0, show_default=True, help="Seed of the draw, init, order and augmentation.")
@click.option("--threshold", type=options.number(0, 1, min_open=True), default=0.95, show_default=True,
              help="Confidence a weak view's prediction needs to become a pseudo label.")
@click.option("--mu", type=options.count(1, 1024), default=7, show_default=True, help="Unlabeled images per labeled image in a step.")
@click.option("--unlabeled-weight", type=options.number(0, 1000), default=1.0, show_default=True,
              help="Weight of the unlabeled loss (0: supervised only, --unlabeled is not read).")
@click.option("--ema-decay", type=options.number(0, 1, max_open=True), default=0.999, show_default=True,
              help="Decay of the weights' moving average that is evaluated and saved.")
@click.option("--steps", type=options.STEPS, default=1000, show_default=True)
@click.option("--batch-size", type=options.BATCH, default=64, show_default=True,
              help="Labeled images per step, all processes (at most the labeled set's size); mu times as many unlabeled.")
@click.option("--lr-head", type=options.LEARNING_RATE, default=3.0, show_default=True, help="Learning rate of the new classifier.")
@click.option("--lr-backbone", type=options.LEARNING_RATE, default=1e-4, show_default=True)
@click.option("--arch", type=click.Choice(ARCHS), default=None, help="Architecture of a plain torchvision --init.")
@click.option("--checkpoint-every", type=options.count(0, 100_000_000), default=200, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True)
@click.option("--workers", type=options.count(0, 64), default=None, help="DataLoader workers (default: half the cores).")
@click.option("--out", required=True, help="Output URI.")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def semi_command(init: str, train_uri: str, unlabeled_uri: str, test_uri: str | None, shots: int | None,
                 labels_file: str | None, seed: int, threshold: float, mu: int, unlabeled_weight: float,
                 ema_decay: float, steps: int, batch_size: int, lr_head: float, lr_backbone: float, arch: str | None,
                 checkpoint_every: int, amp: str, workers: int | None, out: str) -> None:
    """FixMatch from --init: few labeled --train images plus the unlabeled --unlabeled set."""
    if shots is not None and labels_file is not None:
        raise UserError("give either --shots or --labels, not both")
    run = stage.start("semi", store.normalize(out), {
        "init": init, "train": train_uri, "unlabeled": unlabeled_uri, "test": test_uri,
        "shots": shots, "labels": labels_file, "seed": seed, "threshold": threshold, "mu": mu,
        "unlabeled_weight": unlabeled_weight, "ema_decay": ema_decay, "steps": steps, "batch_size": batch_size,
        "lr_head": lr_head, "lr_backbone": lr_backbone, "arch": arch, "amp": amp},
        inputs={"init": init, "train": train_uri, "unlabeled": unlabeled_uri if unlabeled_weight > 0 else None,
                "labels": labels_file, "test": test_uri})
    if run is None:
        return
    data = open_samples(train_uri)
    unlabeled = open_samples(unlabeled_uri, data.channels)
    if len(unlabeled) == 0:
        raise UserError(f"{unlabeled_uri}: no images")
    test = open_samples(test_uri, data.channels) if test_uri is not None else None
    test_labels = align_test_labels(data, test) if test is not None else None
    indices, labels = select_training_set(data, shots, seed, labels_file)
    if len(indices) == 0:
        raise UserError(f"{train_uri}: no labeled images to train on")
    backbone, meta = load_backbone(init, arch=arch, in_channels=data.channels)
    size = image_size_of(data, meta.get("image_size"), "give an --init with a recorded image size")
    per_rank = min(per_rank_batch(batch_size), len(indices))
    workers = default_workers() if workers is None else workers

    main = distributed.env_dist().is_main
    if main:
        run.claim(image_size=size)
        click.echo(f"init: {describe(meta)}", err=True)
    seed_everything(seed)
    task = FixMatchTask(TransferModel(backbone, len(data.classes), size), threshold, unlabeled_weight, ema_decay,
                        lr_head, lr_backbone)
    weak, strong = weak_augment(size), strong_augment(size)
    labeled_images = subset(data, size, indices)
    labeled_batches = LoaderBatches(
        lambda i: (*_views(labeled_images, [weak])(i), labels[i]), len(indices), per_rank, seed,
        num_workers=0 if isinstance(labeled_images, torch.Tensor) else workers)
    source: Any = labeled_batches
    if unlabeled_weight > 0:
        source = PairedBatches(labeled_batches, LoaderBatches(
            _views(Fitted(unlabeled, size), [weak, strong]), len(unlabeled), mu * per_rank, mix_seed(seed, 1),
            num_workers=workers))
    loop = LoopConfig(out=run.out, steps=steps, lr=lr_head, schedule="cosine", momentum=0.9, weight_decay=0.0,
                      checkpoint_every=checkpoint_every, log_every=min(50, max(1, checkpoint_every)), seed=seed, amp=amp)
    result = train(task, source, loop)
    model = task.finish(steps)
    if not main:
        return
    final: dict[str, Any] = dict(result.metrics)
    if test is not None and test_labels is not None:
        test_images, truth = Fitted(test, size), test_labels.numpy()
        final["test_top1"] = score_classifier(model, test_images, truth, data.classes, batch_size=batch_size)["top1"]
        raw = unwrap(task.model).model.cpu()
        final["test_top1_raw"] = score_classifier(raw, test_images, truth, data.classes, batch_size=batch_size)["top1"]
    store.write_text(store.join(run.out, "train_keys.txt"), "".join(data.key(int(i)) + "\n" for i in indices))
    save_model(store.join(run.out, "model.pt"), model.backbone, meta["arch"], meta["in_channels"], size,
               classifier=model.fc, classes=list(data.classes))
    run.finish(trained_on=int(len(indices)),
                     unlabeled_images=len(unlabeled) if unlabeled_weight > 0 else 0, final_metrics=final)
    shown = {k: round(v, 4) for k, v in final.items() if k in ("pseudo_label_rate", "test_top1", "test_top1_raw")}
    click.echo(f"{run.out}: FixMatch on {len(indices)} labeled images" + (f", {shown}" if shown else ""), err=True)
