"""`unsupft pretrain` (MoCo v2: HPT chain, HPT-BN, TUP) and `unsupft bn-adapt` (HPT's base transfer)."""

from __future__ import annotations

import time

import click
import torch

from unsupft import checkpoint, options, stage, store
from unsupft.data.augment import parse_augments, to_input
from unsupft.data.mixing import rebalanced
from unsupft.data.samples import Fitted, Mixture, batches_of, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.models import ARCHS, save_model
from unsupft.models.moco import MoCo, freeze_all_but_bn, save_moco
from unsupft.train.loop import seed_everything
from unsupft.train.moco_stage import MoCoTask, init_moco, moco_options, run_moco, validate_common


@click.command("pretrain")
@click.option("--data", "data_uris", multiple=True, required=True,
              help="Data set URI (repeatable; several are concatenated: the source for TUP).")
@click.option("--target", default=None, help="TUP: target data set, re-balanced against --data.")
@click.option("--target-ratio", type=options.number(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="TUP: target images per epoch as a share of the source size, in (0, 1).")
@click.option("--init", default=None, help="Stage output URI or checkpoint file to start from (MoCo head kept if present).")
@click.option("--freeze", type=click.Choice(["none", "bn-only"]), default="none", show_default=True,
              help="bn-only: HPT-BN, train only BatchNorm affine parameters (and the head).")
@moco_options(default_lr_per_256=0.03, default_epochs=200)
@report_user_errors
def pretrain_command(data_uris, target, target_ratio, init, freeze, out, arch, steps, epochs, batch_size, lr, seed,
                     queue_size, temperature, key_momentum, image_size, augment, checkpoint_every, amp, workers) -> None:
    """MoCo v2 pretraining on one or more data sets; writes model.pt and moco.pt to --out."""
    if target is not None and not 0.0 < target_ratio < 1.0:
        raise UserError(f"--target-ratio must be strictly between 0 and 1 (got {target_ratio})")
    validate_common(batch_size, queue_size, temperature, key_momentum, image_size)
    augments = parse_augments(augment)
    out = store.normalize(out)
    first = open_samples(data_uris[0])
    sets = [first] + [open_samples(u, first.channels) for u in [*data_uris[1:], *([target] if target else [])]]
    size = image_size_of(first, image_size, "give --image-size")
    seed_everything(seed)
    moco, arch, notes = init_moco(init, arch, first.channels, dim=128, queue_size=queue_size,
                                  temperature=temperature, momentum=key_momentum)
    if freeze == "bn-only":
        freeze_all_but_bn(moco)
    n_source = sum(len(s) for s in (sets[:-1] if target else sets))
    order = rebalanced(n_source, len(sets[-1]), target_ratio, seed) if target else None
    config = {"data": list(data_uris), "target": target, "target_ratio": target_ratio if target else None,
              "init": init, "freeze": freeze, "arch": arch, **notes}
    inputs = {"data": ",".join(data_uris), **({"target": target} if target else {}), **({"init": init} if init else {})}
    run_moco("pretrain", out, inputs, config, MoCoTask(moco), Mixture([(s, None) for s in sets]), size, order,
             augments, steps=steps, epochs=epochs,
             batch_size=batch_size, lr=lr, lr_per_256=0.03, seed=seed, checkpoint_every=checkpoint_every, amp=amp,
             workers=workers)


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
    out = store.normalize(out)
    started = time.time()
    data = open_samples(data_uri)
    size = image_size_of(data, None, "bn-adapt needs a data set whose manifest has an image_size")
    moco, arch, notes = init_moco(init, arch, data.channels, dim=128, queue_size=1, temperature=0.2)
    config = {"stage": "bn-adapt", "init": init, "data": data_uri, "arch": arch, "batch_size": batch_size,
              "epochs": epochs, "image_size": size, **notes}
    if stage.is_done(out, config):
        click.echo(f"{out}: already done (same config)", err=True)
        return
    stage.write_config(out, config)
    reestimate_bn(moco, Fitted(data, size), batch_size, epochs)
    moco.reset_key_encoder()
    store.write_text(store.join(out, stage.METRICS),
                     f'{{"step": {epochs}, "samples": {len(data) * epochs}}}\n')
    save_model(store.join(out, "model.pt"), moco.backbone, arch, moco.backbone.in_channels, size)
    save_moco(store.join(out, "moco.pt"), moco, arch, moco.backbone.in_channels, size)
    stage.write_done(out, "bn-adapt", config, {"init": init, "data": data_uri},
                     ["model.pt", "moco.pt", stage.METRICS, stage.CONFIG], started)


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

