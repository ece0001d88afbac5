"""What `pretrain`, `adapt` and `bn-adapt` share: lazily read data sets, MoCo from `--init`, the
MoCo training task, and writing the stage outputs.

Every input is read and checked before anything is written, so bad input (a missing or
foreign `--init`, an empty data set, mismatched channels) ends with one line and an untouched
output URI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import click
import torch

from unsupft import checkpoint, distributed, options, stage, store
from unsupft.data.augment import DEFAULT_AUGMENTS, DEFAULT_CROP_SCALE, moco_v2_augment, parse_augments
from unsupft.data.mixing import cutmix, mixup
from unsupft.data.samples import Mixture, default_workers
from unsupft.data.shardcache import window_bytes
from unsupft.preprocess import fit, to_input
from unsupft.errors import UserError
from unsupft.models import ARCHS, build_backbone, load_backbone, save_model
from unsupft.models.io import describe
from unsupft.models.moco import MoCo, save_moco
from unsupft.train.batches import MIN_BN_BATCH, EpochOrder, LoaderBatches, ShardWindows, Shuffled, require_bn_batch
from unsupft.train.loop import LoopConfig, TrainTask, train, unwrap

MIXES = ("cutmix", "mixup", "none")


def init_moco(init: str | None, arch: str | None, in_channels: int, *, dim: int, queue_size: int,
              temperature: float, momentum: float = 0.999) -> tuple[MoCo, str, dict[str, Any]]:
    """MoCo around a new backbone or the one in `init`; the projection head is taken over when
    `init` has one (a stage output with moco.pt, a moco.pt file, a facebookresearch checkpoint),
    otherwise initialised afresh. Returns (moco, arch, notes for the config)."""
    if init is None:
        backbone = build_backbone(arch or "tiny", in_channels)
        return MoCo(backbone, dim, queue_size, momentum, temperature), backbone.arch, {"head": "new"}
    moco_file = store.join(init, "moco.pt")
    source = moco_file if not init.endswith(checkpoint.SUFFIXES) and store.exists(moco_file) else init
    backbone, meta = load_backbone(source, arch=arch, in_channels=in_channels)
    notes: dict[str, Any] = {"head": "new", "init_format": meta.get("format")}
    moco = MoCo(backbone, dim, queue_size, momentum, temperature)
    if meta.get("head"):
        try:
            moco.head.load_state_dict(meta["head"])
            notes["head"] = "loaded"
        except RuntimeError:  # a head of another size: keep the fresh one
            notes["head"] = "new (init head has another shape)"
        moco.reset_key_encoder()
    click.echo(f"init: {describe(meta, notes['head'])}", err=True)
    return moco, backbone.arch, notes


class MoCoTask(TrainTask):
    """One MoCo v2 step on a batch of two views; with `mix`, also the mixed-query loss."""

    def __init__(self, moco: MoCo, mix: str = "none", mix_alpha: float = 1.0) -> None:
        self.model, self.mix, self.mix_alpha = moco, mix, mix_alpha

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int):
        view_q, view_k = batch
        if self.mix == "none":
            return self.model(view_q, view_k)
        # Batches come in random order, so each image is mixed with its predecessor.
        partner = torch.roll(torch.arange(len(view_q), device=view_q.device), 1)
        mixed, lam = (cutmix if self.mix == "cutmix" else mixup)(view_q, partner, self.mix_alpha)
        loss, metrics = self.model(view_q, view_k, mixed=mixed, mix_partner=partner, lam=lam)
        return loss, {**metrics, "lam": lam}


def two_view_batches(images: Mixture, image_size: Sequence[int], augments: Sequence[str], batch_size: int,
                     seed: int, order: EpochOrder | None, workers: int,
                     crop_scale: float = DEFAULT_CROP_SCALE) -> LoaderBatches:
    """Two augmented views of each sample, read and decoded in the DataLoader workers. The crop
    takes the stored image straight to `image_size` (MoCo's RandomResizedCrop); without "crop" the
    image is fitted to it first."""
    augment = moco_v2_augment(image_size, augments, crop_scale)
    crops = "crop" in augments

    def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = images.image(i) if crops else fit(images.image(i), image_size)
        return to_input(augment(image)), to_input(augment(image))

    return LoaderBatches(sample, len(images), batch_size, seed, order=order, num_workers=workers)


def steps_for(steps: int | None, epochs: float | None, samples_per_epoch: int, batch_size: int) -> int:
    """The training length in steps; the options' types keep both positive."""
    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if steps is not None:
        return steps
    return max(1, math.ceil((epochs or DEFAULT_EPOCHS) * samples_per_epoch / batch_size))


DEFAULT_EPOCHS = 200.0  # training length when neither --steps nor --epochs is given
AUTO_QUEUE_CAP = 65536  # MoCo v2's queue: what "auto" gives an epoch of ImageNet's size


def batch_for(requested: int, epoch_size: int) -> tuple[int, str]:
    """The global batch of a MoCo run over epochs of `epoch_size` samples and why (config.json
    records both): `--batch-size`, or an epoch (rounded down to a whole batch per process) when it
    is larger. A batch larger than the data set would hold images more than once: fewer distinct
    images than the batch (and the learning rate scaled for it) claims. Refused, before anything is
    written, when a process would get fewer than 2 images: MoCo trains BatchNorm."""
    world = distributed.env_dist().world_size
    require_bn_batch(requested, world)
    if requested <= epoch_size:
        return requested, "given"
    batch = epoch_size // world * world
    if batch // world < MIN_BN_BATCH:
        raise UserError(f"the data set has {epoch_size} samples per epoch: too few for batches of "
                        f"{MIN_BN_BATCH} images per process ({world} processes)")
    reason = (f"--batch-size {requested} is larger than the data set's epoch ({epoch_size} samples): batches "
              f"of {batch}, so that no image repeats within a batch")
    if distributed.env_dist().is_main:
        click.echo(f"warning: {reason} (config.json records it under resolved)", err=True)
    return batch, reason


def queue_size_for(requested: int | str, epoch_size: int, batch_size: int) -> tuple[int, str]:
    """The MoCo queue's length for `--queue-size` and why (config.json records both).

    A queue longer than an epoch holds keys of the very images being queried: an image's own older
    key becomes one of its negatives, which contradicts what InfoNCE means (issue 12). "auto" keeps
    the queue within an epoch, a whole number of batches long (each step then replaces a whole
    batch of keys, as in facebookresearch/moco, which asserts `K % batch == 0`), at most MoCo v2's
    65,536. An explicit value is honoured, with a warning when it exceeds the epoch. (The stages'
    batch is at most an epoch, `batch_for`.)
    """
    if requested != "auto":
        if requested > epoch_size and distributed.env_dist().is_main:
            click.echo(f"warning: --queue-size {requested} is larger than an epoch ({epoch_size} samples): "
                       f"images meet their own older keys as negatives", err=True)
        return int(requested), "given"
    if epoch_size < batch_size:
        return batch_size, (f"auto: one batch ({batch_size}), since the epoch ({epoch_size} samples) is "
                            f"smaller than a batch")
    size = min(epoch_size, AUTO_QUEUE_CAP) // batch_size * batch_size
    bound = f"the epoch ({epoch_size} samples)" if epoch_size <= AUTO_QUEUE_CAP else f"the cap {AUTO_QUEUE_CAP}"
    return size, f"auto: {bound} rounded down to a multiple of the batch ({batch_size})"


def batch_and_queue(config: MoCoOptions, epoch_size: int) -> dict[str, Any]:
    """What a MoCo run resolves from the size of its epoch, as config.json records it under
    "resolved": the batch (`batch_for`) and the queue's length (`queue_size_for`), each with why."""
    batch, batch_reason = batch_for(config.batch_size, epoch_size)
    queue, queue_reason = queue_size_for(config.queue_size, epoch_size, batch)
    return {"batch_size": batch, "batch_size_reason": batch_reason, "queue_size": queue,
            "queue_size_reason": queue_reason}


def lr_option(per_256: float) -> Any:
    """`--lr`, whose default follows the batch size at the stage's rate."""
    return options.option(None, type=options.LEARNING_RATE,
                          help=f"Peak SGD learning rate (default {per_256} * batch / 256).")


@dataclass(frozen=True, kw_only=True)
class MoCoRecipe(options.Options):
    """How a MoCo run makes and contrasts its views: what suits the data rather than the budget
    (8 px digits need larger crops and no flip). `pretrain` and `adapt` take these options, and so
    does `select-source`, which hands them to every candidate's run."""

    temperature: float = options.option(0.2, type=options.number(0, 100, min_open=True))
    key_momentum: float = options.option(0.999, type=options.number(0, 1, max_open=True),
                                         help="Key encoder momentum (short runs on small data learn faster with 0.99).")
    augment: str = options.option(",".join(DEFAULT_AUGMENTS), help="Comma list of augmentations (or 'none').")
    crop_scale: float = options.option(DEFAULT_CROP_SCALE, type=options.number(0, 1, min_open=True),
                                       help="Smallest random crop, as a share of the image's area.")

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "augment": list(parse_augments(self.augment))}


@dataclass(frozen=True, kw_only=True)
class MoCoOptions(MoCoRecipe, stage.StageOptions):
    """The options `pretrain` and `adapt` share (a stage's config extends this class): one field,
    one option."""

    lr_per_256: ClassVar[float] = 0.03  # the default --lr per 256 images (MoCo v2's); adapt's is lower

    arch: str | None = options.option(None, type=click.Choice(ARCHS), help="Backbone (default: the --init's, else tiny).")
    steps: int | None = options.option(None, type=options.STEPS, help="Training length in optimizer steps.")
    epochs: float | None = options.option(
        None, type=options.number(0, 100_000, min_open=True),
        help=f"Training length in epochs (default {DEFAULT_EPOCHS:g} when --steps is not given).")
    batch_size: int = options.option(256, type=options.BATCH, help="Global batch (all processes).")
    lr: float | None = lr_option(lr_per_256)
    seed: int = options.option(0, type=options.SEED)
    queue_size: int | str = options.option(
        "auto", type=options.CountOrAuto(1, 1 << 20),
        help=f"Negative keys kept (at most 2^20: 128 floats each). auto: an epoch's samples rounded "
             f"down to a multiple of the batch, at most {AUTO_QUEUE_CAP}.")
    image_size: int | None = options.option(None, type=options.count(8, 1024), help="Resize images to this square size.")
    checkpoint_every: int = options.option(500, type=options.count(0, 100_000_000), hashed=False)
    amp: str = options.option("auto", type=click.Choice(["auto", "bf16", "off"]), hashed=False)
    workers: int | None = options.option(None, type=options.count(0, 64), hashed=False,
                                         help="DataLoader workers (default: half the cores).")


def run_moco(run: stage.StageRun, task: MoCoTask, images: Mixture, size: list[int], order: EpochOrder | None,
             config: MoCoOptions, resolved: dict[str, Any]) -> None:
    """Resolve length and lr, train, and write the stage outputs: config.json first, metrics.jsonl
    and checkpoint.pt by the loop, then model.pt, moco.pt and _DONE.json last. `resolved` holds the
    batch (`batch_for`) and the queue's length."""
    # read a window of shards at a time (docs/data.md): what makes S3 fast; small sets are unchanged
    order = ShardWindows(order or Shuffled(len(images), config.seed), *images.shard_layout(), window_bytes(),
                         config.seed)
    epoch_size = order.size
    if order.windowed:
        resolved = {**resolved, "shuffle_window_bytes": order.window_bytes}
    batch_size = resolved["batch_size"]
    steps = steps_for(config.steps, config.epochs, epoch_size, batch_size)
    lr = config.lr if config.lr is not None else config.lr_per_256 * batch_size / 256
    in_channels = task.model.backbone.in_channels
    augments = parse_augments(config.augment)
    batches = two_view_batches(images, size, augments, distributed.per_rank_batch(batch_size), config.seed, order,
                               default_workers() if config.workers is None else config.workers, config.crop_scale)
    loop = LoopConfig(out=run.out, steps=steps, lr=lr, weight_decay=1e-4, momentum=0.9,
                      checkpoint_every=config.checkpoint_every, seed=config.seed, amp=config.amp)
    main = distributed.env_dist().is_main
    if main:
        run.claim(**resolved, in_channels=in_channels, image_size=size, steps=steps, lr=lr,
                  samples_per_epoch=epoch_size)
    result = train(task, batches, loop)
    if main:
        moco = unwrap(task.model).cpu()
        save_model(store.join(run.out, "model.pt"), moco.backbone, resolved["arch"], in_channels, size)
        save_moco(store.join(run.out, "moco.pt"), moco, resolved["arch"], in_channels, size)
        run.finish(final_metrics=result.metrics)
