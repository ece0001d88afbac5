"""`unsupft adapt`: unsupervised finetuning of a pretrained model on a small unlabeled target.

MoCo v2 continues from `--init` on the target, with sparse source replay (a fixed, seeded
`--replay-fraction` of `--replay-source`, chosen once; every epoch holds the whole target and
`--replay-ratio` times as many images drawn from that subset) and data mixing (a CutMix or
MixUp query, positive for both its keys, loss `lam*L(qm,ka) + (1-lam)*L(qm,kb)` added to InfoNCE).
Naive unsupervised finetuning is `--replay-fraction 0 --mix none`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import click

from unsupft import options, stage, store
from unsupft.data.mixing import replay_subset, with_replay
from unsupft.data.samples import Mixture, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.seeding import seed_everything
from unsupft.stages.moco_common import MIXES, MoCoOptions, MoCoTask, batch_and_queue, init_moco, lr_option, run_moco


@dataclass(frozen=True, kw_only=True)
class AdaptConfig(MoCoOptions):
    lr_per_256: ClassVar[float] = 0.015  # half pretraining's: finetuning starts from a trained model

    init: str = options.option(help="Pretrained stage output URI or checkpoint file.")
    target: str = options.option(help="Unlabeled target data set URI.")
    replay_source: str | None = options.option(None, help="Source data set to replay a fixed subset of.")
    replay_fraction: float = options.option(0.1, type=options.number(0, 1, max_open=True),
                                            help="Share of --replay-source replayed (0 = no replay).")
    replay_ratio: float = options.option(
        1.0, type=options.number(0, 1000, min_open=True),
        help="Replayed images per epoch, as a multiple of the target's size (drawn from the fixed subset).")
    mix: str = options.option("cutmix", type=click.Choice(MIXES))
    mix_alpha: float = options.option(1.0, type=options.number(0, 100, min_open=True), help="lam ~ Beta(alpha, alpha).")
    lr: float | None = lr_option(lr_per_256)

    def identity(self) -> dict[str, Any]:
        replaying = bool(self.replay_source and self.replay_fraction)
        return {**super().identity(), "replay_fraction": self.replay_fraction if self.replay_source else 0.0,
                "replay_ratio": self.replay_ratio if replaying else None}


@click.command("adapt")
@options.options_from(AdaptConfig)
@report_user_errors
def adapt_command(config: AdaptConfig) -> None:
    """Unsupervised finetuning (MoCo v2 with source replay and mixed queries) from --init on --target."""
    run = stage.start("adapt", store.normalize(config.out), config.identity(),
                      {"init": config.init, "target": config.target, "replay_source": config.replay_source})
    if run is None:
        return
    tgt = open_samples(config.target)
    size = image_size_of(tgt, config.image_size, "give --image-size")
    images, order, replayed = Mixture([(tgt, None)]), None, 0
    if config.replay_source is not None and config.replay_fraction > 0:
        # the replayed subset is chosen by index from the source's size alone: nothing is decoded
        source = open_samples(config.replay_source, tgt.channels)
        subset = replay_subset(len(source), config.replay_fraction, config.seed)
        if len(subset) == 0:
            raise UserError(f"--replay-fraction {config.replay_fraction} of {config.replay_source} selects no image")
        images = Mixture([(tgt, None), (source, subset.numpy())])
        order, replayed = with_replay(len(tgt), subset, config.seed, config.replay_ratio), len(subset)
    sizes = batch_and_queue(config, order.size if order else len(images))
    seed_everything(config.seed)
    moco, arch, notes = init_moco(config.init, config.arch, tgt.channels, dim=128, queue_size=sizes["queue_size"],
                                  temperature=config.temperature, momentum=config.key_momentum)
    run_moco(run, MoCoTask(moco, config.mix, config.mix_alpha), images, size, order, config,
             resolved={"arch": arch, "replayed_images": replayed, **notes, **sizes})
