"""`unsupft pretrain`: MoCo v2 pretraining (HPT chain, HPT-BN, TUP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from unsupft import options, stage, store
from unsupft.data.mixing import rebalanced
from unsupft.data.samples import Mixture, image_size_of, open_samples
from unsupft.errors import report_user_errors
from unsupft.models.moco import freeze_all_but_bn
from unsupft.seeding import seed_everything
from unsupft.stages.moco_common import MoCoOptions, MoCoTask, batch_and_queue, init_moco, run_moco


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(MoCoOptions):
    data: tuple[str, ...] = options.option(
        multiple=True, help="Data set URI (repeatable; several are concatenated: the source for TUP).")
    target: str | None = options.option(None, help="TUP: target data set, re-balanced against --data.")
    target_ratio: float = options.option(
        0.2, type=options.number(0, 1, min_open=True, max_open=True),
        help="TUP: target images per epoch as a share of the source size, in (0, 1).")
    init: str | None = options.option(
        None, help="Stage output URI or checkpoint file to start from (MoCo head kept if present).")
    freeze: str = options.option("none", type=click.Choice(["none", "bn-only"]),
                                 help="bn-only: HPT-BN, train only BatchNorm affine parameters (and the head).")

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "target_ratio": self.target_ratio if self.target else None}


@click.command("pretrain")
@options.options_from(PretrainConfig)
@report_user_errors
def pretrain_command(config: PretrainConfig) -> None:
    """MoCo v2 pretraining on one or more data sets; writes model.pt and moco.pt to --out."""
    pretrain(config)


def pretrain(config: PretrainConfig) -> None:
    """The stage itself, also run by `select-source` for each candidate."""
    run = stage.start("pretrain", store.normalize(config.out), config.identity(),
                      {"data": config.data, "target": config.target, "init": config.init})
    if run is None:
        return
    first = open_samples(config.data[0])
    target = [config.target] if config.target else []
    sets = [first] + [open_samples(u, first.channels) for u in [*config.data[1:], *target]]
    size = image_size_of(first, config.image_size, "give --image-size")
    n_source = sum(len(s) for s in (sets[:-1] if target else sets))
    order = rebalanced(n_source, len(sets[-1]), config.target_ratio, config.seed) if target else None
    images = Mixture([(s, None) for s in sets])
    sizes = batch_and_queue(config, order.size if order else len(images))
    seed_everything(config.seed)
    moco, arch, notes = init_moco(config.init, config.arch, first.channels, dim=128, queue_size=sizes["queue_size"],
                                  temperature=config.temperature, momentum=config.key_momentum)
    if config.freeze == "bn-only":
        freeze_all_but_bn(moco)
    run_moco(run, MoCoTask(moco), images, size, order, config, resolved={"arch": arch, **notes, **sizes})
