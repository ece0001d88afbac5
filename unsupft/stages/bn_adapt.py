"""`unsupft bn-adapt`: HPT's base transfer, BatchNorm statistics re-estimated on the target."""

from __future__ import annotations


import click
import torch

from unsupft import checkpoint, options, stage, store
from unsupft.data.samples import Fitted, batches_of, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.models import ARCHS, save_model
from unsupft.models.moco import MoCo, save_moco
from unsupft.preprocess import to_input
from unsupft.stages.moco_common import init_moco


@click.command("bn-adapt")
@click.option("--init", required=True, help="Stage output URI or checkpoint file whose backbone to adapt.")
@click.option("--data", "data_uri", required=True, help="Data set whose BatchNorm statistics to adopt.")
@click.option("--out", required=True, help="Output URI (directory or s3://bucket/prefix).")
@click.option("--arch", type=click.Choice(ARCHS), default=None,
              help="Architecture of a plain state_dict --init (default: read from the checkpoint).")
@click.option("--batch-size", type=options.BATCH, default=256, show_default=True,
              help="Images per forward pass; BatchNorm statistics are averaged over these batches.")
@click.option("--epochs", type=options.EPOCHS, default=1, show_default=True,
              help="Passes over --data; the batches carry no augmentation, so every pass adds the same statistics.")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def bn_adapt_command(init, data_uri, out, arch, batch_size, epochs) -> None:
    """HPT's base transfer: re-estimate BatchNorm running statistics on --data; nothing else changes."""
    if batch_size < 1 or epochs < 1:
        raise UserError("--batch-size and --epochs must be positive")
    run = stage.start("bn-adapt", store.normalize(out), {
        "init": init, "data": data_uri, "arch": arch, "batch_size": batch_size, "epochs": epochs},
        inputs={"init": init, "data": data_uri})
    if run is None:
        return
    data = open_samples(data_uri)
    size = image_size_of(data, None, "bn-adapt needs a data set whose manifest has an image_size")
    moco, arch, notes = init_moco(init, arch, data.channels, dim=128, queue_size=1, temperature=0.2)
    run.claim(arch=arch, image_size=size, **notes)
    reestimate_bn(moco, Fitted(data, size), batch_size, epochs)
    moco.reset_key_encoder()
    store.write_text(store.join(run.out, stage.METRICS_FILE),
                     f'{{"step": {epochs}, "samples": {len(data) * epochs}}}\n')
    save_model(store.join(run.out, "model.pt"), moco.backbone, arch, moco.backbone.in_channels, size)
    save_moco(store.join(run.out, "moco.pt"), moco, arch, moco.backbone.in_channels, size)
    run.finish()


@torch.no_grad()
def reestimate_bn(moco: MoCo, images: Fitted, batch_size: int, epochs: int) -> None:
    """Replace every BatchNorm's running statistics by their average over the data (momentum None),
    reading it batch by batch."""
    backbone = moco.backbone
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts the same
    backbone.train()
    for _ in range(epochs):
        for batch in batches_of(images, batch_size):
            backbone(to_input(batch))
    for bn in bns:
        bn.momentum = 0.1
    backbone.eval()

