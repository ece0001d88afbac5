"""`unsupft adapt`: unsupervised finetuning of a pretrained model on a small unlabeled target.

MoCo v2 continues from `--init` on the target, with sparse source replay (a fixed, seeded
`--replay-fraction` of `--replay-source`, chosen once; every epoch holds the whole target and
`--replay-ratio` times as many images drawn from that subset) and data mixing (a CutMix or
MixUp query, positive for both its keys, loss `lam*L(qm,ka) + (1-lam)*L(qm,kb)` added to InfoNCE).
Naive unsupervised finetuning is `--replay-fraction 0 --mix none`.
"""

from __future__ import annotations

import click

from unsupft import options
from unsupft.data.mixing import replay_subset, with_replay
from unsupft.data.samples import Mixture, image_size_of, open_samples
from unsupft.errors import UserError, report_user_errors
from unsupft.seeding import seed_everything
from unsupft.stages.moco_common import (MIXES, MoCoOptions, MoCoTask, init_moco, moco_options, queue_size_for,
                                        run_moco, start_moco)


REPLAY_RATIO = 1.0  # replayed source images per target image in an epoch


@click.command("adapt")
@click.option("--init", required=True, help="Pretrained stage output URI or checkpoint file.")
@click.option("--target", required=True, help="Unlabeled target data set URI.")
@click.option("--replay-source", default=None, help="Source data set to replay a fixed subset of.")
@click.option("--replay-fraction", type=options.number(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of --replay-source replayed (0 = no replay).")
@click.option("--replay-ratio", type=options.number(0, 1000, min_open=True), default=REPLAY_RATIO, show_default=True,
              help="Replayed images per epoch, as a multiple of the target's size (drawn from the fixed subset).")
@click.option("--mix", type=click.Choice(MIXES), default="cutmix", show_default=True)
@click.option("--mix-alpha", type=options.number(0, 100, min_open=True), default=1.0, show_default=True, help="lam ~ Beta(alpha, alpha).")
@moco_options(default_lr_per_256=0.015)
@report_user_errors
def adapt_command(init, target, replay_source, replay_fraction, replay_ratio, mix, mix_alpha, **shared_options) -> None:
    """Unsupervised finetuning (MoCo v2 with source replay and mixed queries) from --init on --target."""
    shared = MoCoOptions(**shared_options)
    run = start_moco("adapt", {"init": init, "target": target, "replay_source": replay_source,
                               "replay_fraction": replay_fraction if replay_source else 0.0,
                               "replay_ratio": replay_ratio if replay_source and replay_fraction else None, "mix": mix,
                               "mix_alpha": mix_alpha},
                     {"init": init, "target": target, "replay_source": replay_source}, shared)
    if run is None:
        return
    tgt = open_samples(target)
    size = image_size_of(tgt, shared.image_size, "give --image-size")
    images, order, replayed = Mixture([(tgt, None)]), None, 0
    if replay_source is not None and replay_fraction > 0:
        # the replayed subset is chosen by index from the source's size alone: nothing is decoded
        source = open_samples(replay_source, tgt.channels)
        subset = replay_subset(len(source), replay_fraction, shared.seed)
        if len(subset) == 0:
            raise UserError(f"--replay-fraction {replay_fraction} of {replay_source} selects no image")
        images = Mixture([(tgt, None), (source, subset.numpy())])
        order, replayed = with_replay(len(tgt), subset, shared.seed, replay_ratio), len(subset)
    queue_size, queue_reason = queue_size_for(shared.queue_size, order.size if order else len(images), shared.batch_size)
    seed_everything(shared.seed)
    moco, arch, notes = init_moco(init, shared.arch, tgt.channels, dim=128, queue_size=queue_size,
                                  temperature=shared.temperature, momentum=shared.key_momentum)
    run_moco(run, MoCoTask(moco, mix, mix_alpha), images, size, order, shared, lr_per_256=0.015,
             resolved={"arch": arch, "replayed_images": replayed, **notes, "queue_size": queue_size,
                       "queue_size_reason": queue_reason})
