"""`unsupft pretrain`: MoCo v2 pretraining (HPT chain, HPT-BN, TUP)."""

from __future__ import annotations

import click

from unsupft import options
from unsupft.data.mixing import rebalanced
from unsupft.data.samples import Mixture, image_size_of, open_samples
from unsupft.errors import report_user_errors
from unsupft.models.moco import freeze_all_but_bn
from unsupft.seeding import seed_everything
from unsupft.stages.moco_common import (MoCoOptions, MoCoTask, init_moco, moco_options, queue_size_for, run_moco,
                                        start_moco)


@click.command("pretrain")
@click.option("--data", "data_uris", multiple=True, required=True,
              help="Data set URI (repeatable; several are concatenated: the source for TUP).")
@click.option("--target", default=None, help="TUP: target data set, re-balanced against --data.")
@click.option("--target-ratio", type=options.number(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="TUP: target images per epoch as a share of the source size, in (0, 1).")
@click.option("--init", default=None, help="Stage output URI or checkpoint file to start from (MoCo head kept if present).")
@click.option("--freeze", type=click.Choice(["none", "bn-only"]), default="none", show_default=True,
              help="bn-only: HPT-BN, train only BatchNorm affine parameters (and the head).")
@moco_options(default_lr_per_256=0.03)
@report_user_errors
def pretrain_command(data_uris, target, target_ratio, init, freeze, **shared_options) -> None:
    """MoCo v2 pretraining on one or more data sets; writes model.pt and moco.pt to --out."""
    shared = MoCoOptions(**shared_options)
    run = start_moco("pretrain", {"data": list(data_uris), "target": target,
                                  "target_ratio": target_ratio if target else None, "init": init, "freeze": freeze},
                     {"data": data_uris, "target": target, "init": init}, shared)
    if run is None:
        return
    first = open_samples(data_uris[0])
    sets = [first] + [open_samples(u, first.channels) for u in [*data_uris[1:], *([target] if target else [])]]
    size = image_size_of(first, shared.image_size, "give --image-size")
    n_source = sum(len(s) for s in (sets[:-1] if target else sets))
    order = rebalanced(n_source, len(sets[-1]), target_ratio, shared.seed) if target else None
    images = Mixture([(s, None) for s in sets])
    queue_size, queue_reason = queue_size_for(shared.queue_size, order.size if order else len(images), shared.batch_size)
    seed_everything(shared.seed)
    moco, arch, notes = init_moco(init, shared.arch, first.channels, dim=128, queue_size=queue_size,
                                  temperature=shared.temperature, momentum=shared.key_momentum)
    if freeze == "bn-only":
        freeze_all_but_bn(moco)
    run_moco(run, MoCoTask(moco), images, size, order, shared, lr_per_256=0.03,
             resolved={"arch": arch, **notes, "queue_size": queue_size, "queue_size_reason": queue_reason})
