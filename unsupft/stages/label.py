"""`unsupft label`: progressive few-label transfer with a person or an oracle in the loop; the
rounds, their state and resuming are `unsupft.select.progressive`'s."""

from __future__ import annotations

import sys
from typing import Any

import click

from unsupft import checkpoint, options, stage, store
from unsupft.data.samples import Fitted, open_samples
from unsupft.errors import EXIT_WAITING_FOR_LABELS, UserError, report_user_errors
from unsupft.select.annotators import WaitingForLabels
from unsupft.select.progressive import (LabelConfig, TransferEngine, initial_keys, load_target, make_annotator,
                                        model_uri, run_label)


@click.command("label")
@click.option("--init", help="Model to start from (model.pt, moco.pt or a stage output URI).")
@click.option("--data", help="Target data set URI (shards; labels used only by --annotator oracle).")
@click.option("--test", default=None, help="Labeled test set URI: per-round accuracy in rounds.jsonl.")
@click.option("--budget", type=options.number(0, 10_000), default=1.0, show_default=True,
              help="Extra labels per class on average (epsilon): epsilon*C labels beyond the initial set.")
@click.option("--per-round", type=options.count(1, 10_000), default=1, show_default=True,
              help="b: K = b*C new centers (labels) per round; the last round takes what is left.")
@click.option("--initial", default="seeded", show_default=True,
              help="'seeded': one per class chosen by --seed (manual: the C ACKMeans eigen-samples), "
                   "or a CSV of keys (optional label column).")
@click.option("--annotator", type=click.Choice(["oracle", "manual"]), default="oracle", show_default=True)
@click.option("--selector", type=click.Choice(["ackmeans", "random"]), default="ackmeans", show_default=True)
@click.option("--method", type=click.Choice(["ce", "coin", "bituning"]), default="ce", show_default=True)
@click.option("--epochs", type=options.EPOCHS, default=30, show_default=True)
@click.option("--seed", type=options.SEED, default=0, show_default=True)
@click.option("--out", required=True, help="Output URI (state, requests, labels, models).")
@click.option("--resume", is_flag=True, help="Continue the run in --out with its stored config (other options may be left out).")
@checkpoint.trust_option
@stage.overwrite_option
@report_user_errors
def label_command(resume: bool, **options: Any) -> None:
    """Progressive few-label transfer: ACKMeans selection, annotation and finetuning, round by round."""
    out = store.normalize(options["out"])
    stored = store.join(out, stage.CONFIG)
    if resume:
        if not store.exists(stored):
            raise UserError(f"{out}: nothing to resume (no {stage.CONFIG})")
        cfg = LabelConfig.from_config(store.read_json(stored), out)
    else:
        missing = [name for name in ("init", "data") if not options[name]]
        if missing:
            raise UserError(f"missing --{' and --'.join(missing)} (or pass --resume to continue a run)")
        cfg = LabelConfig(**{**options, "out": out})
        if store.exists(stored) and LabelConfig.from_config(store.read_json(stored), out) != cfg:
            raise UserError(f"{out}: holds a label run with another config; use --resume or another --out")
    run = stage.start("label", out, cfg.as_dict(), inputs={"init": cfg.init, "data": cfg.data, "test": cfg.test})
    if run is None:
        return
    # Every input is read and checked before the first write (a refused run leaves --out untouched).
    engine = TransferEngine()
    target = load_target(cfg.data, engine.image_size(cfg.init))
    test = None
    if cfg.test:
        t = open_samples(cfg.test, target.images.samples.channels)
        test = (Fitted(t, target.images.size), t.labels)
    engine.check_init(cfg.init, target.images.samples.channels)
    if cfg.initial != "seeded":
        initial_keys(cfg, target, engine)  # the key file: readable, known keys and classes
    run.claim()
    try:
        state = run_label(cfg, target, make_annotator(cfg, target, engine), engine, test,
                          log=lambda line: click.echo(line, err=True))
    except WaitingForLabels as waiting:
        click.echo(str(waiting))
        sys.exit(EXIT_WAITING_FOR_LABELS)
    store.write_bytes(store.join(out, "model.pt"), store.read_bytes(model_uri(out, state.round)))
    run.finish(labels=len(state.labeled))
