"""`unsupft bn-adapt`: HPT's base transfer, BatchNorm statistics re-estimated on the target."""

from __future__ import annotations

from dataclasses import dataclass

import click
import torch

from unsupft import options, stage, store
from unsupft.data.samples import Fitted, batches_of, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.models import ARCHS, save_model
from unsupft.models.moco import MoCo, save_moco
from unsupft.preprocess import to_input
from unsupft.stages.moco_common import init_moco
from unsupft.train.batches import MIN_BN_BATCH, require_bn_batch


@dataclass(frozen=True, kw_only=True)
class BnAdaptConfig(stage.StageOptions):
    init: str = options.option(help="Stage output URI or checkpoint file whose backbone to adapt.")
    data: str = options.option(help="Data set whose BatchNorm statistics to adopt.")
    arch: str | None = options.option(
        None, type=click.Choice(ARCHS), help="Architecture of a plain state_dict --init (default: read from the checkpoint).")
    batch_size: int = options.option(
        256, type=options.BATCH, help="Images per forward pass; BatchNorm statistics are averaged over these batches.")
    epochs: int = options.option(
        1, type=options.EPOCHS,
        help="Passes over --data; the batches carry no augmentation, so every pass adds the same statistics.")


@click.command("bn-adapt")
@options.options_from(BnAdaptConfig)
@report_user_errors
def bn_adapt_command(config: BnAdaptConfig) -> None:
    """HPT's base transfer: re-estimate BatchNorm running statistics on --data; nothing else changes."""
    run = stage.start("bn-adapt", store.normalize(config.out), config.identity(),
                      inputs={"init": config.init, "data": config.data})
    if run is None:
        return
    require_bn_batch(config.batch_size)
    data = open_samples(config.data)
    if len(data) < MIN_BN_BATCH:
        raise UserError(f"{config.data}: holds {len(data)} image; BatchNorm statistics need at least {MIN_BN_BATCH}")
    size = image_size_of(data, None, "bn-adapt needs a data set whose manifest has an image_size")
    moco, arch, notes = init_moco(config.init, config.arch, data.channels, dim=128, queue_size=1, temperature=0.2)
    run.claim(arch=arch, image_size=size, **notes)
    samples = reestimate_bn(moco, Fitted(data, size), config.batch_size, config.epochs)
    moco.reset_key_encoder()
    store.write_text(store.join(run.out, stage.METRICS_FILE), f'{{"step": {config.epochs}, "samples": {samples}}}\n')
    save_model(store.join(run.out, "model.pt"), moco.backbone, arch, moco.backbone.in_channels, size)
    save_moco(store.join(run.out, "moco.pt"), moco, arch, moco.backbone.in_channels, size)
    run.finish()


@torch.no_grad()
def reestimate_bn(moco: MoCo, images: Fitted, batch_size: int, epochs: int) -> int:
    """Replace every BatchNorm's running statistics by their average over the data (momentum None),
    reading it batch by batch; returns the images that counted. A last batch of one image is left
    out (as DataLoader's `drop_last` would): BatchNorm cannot normalise a single image."""
    counted = 0
    backbone = moco.backbone
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
    backbone.train()
    for _ in range(epochs):
        for batch in batches_of(images, batch_size):
            if len(batch) >= MIN_BN_BATCH:
                backbone(to_input(batch))
                counted += len(batch)
    for bn in bns:
        bn.momentum = 0.1
    backbone.eval()
    return counted
