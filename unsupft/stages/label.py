"""`unsupft label`: progressive few-label transfer with a person or an oracle in the loop; the
rounds, their state and resuming are `unsupft.select.progressive`'s."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click
import torch

from unsupft import options, stage, store
from unsupft.data.samples import Fitted, open_samples
from unsupft.errors import EXIT_WAITING_FOR_LABELS, UserError, report_user_errors
from unsupft.eval.classifier import labels_in_classes
from unsupft.select.annotators import WaitingForLabels
from unsupft.select.progressive import (LabelConfig, TransferEngine, initial_keys, load_target, make_annotator,
                                        model_uri, run_label)


@dataclass(frozen=True, kw_only=True)
class LabelOptions(stage.StageOptions):
    """The options of `label`; the run itself is the library's `LabelConfig` (whose defaults these are)."""

    init: str | None = options.option(None, help="Model to start from (model.pt, moco.pt or a stage output URI).")
    data: str | None = options.option(None, help="Target data set URI (shards; labels used only by --annotator oracle).")
    test: str | None = options.option(None, help="Labeled test set URI: per-round accuracy in rounds.jsonl.")
    budget: float = options.option(
        LabelConfig.budget, type=options.number(0, 10_000),
        help="Extra labels per class on average (epsilon): epsilon*C labels beyond the initial set.")
    per_round: int = options.option(LabelConfig.per_round, type=options.count(1, 10_000),
                                    help="b: K = b*C new centers (labels) per round; the last round takes what is left.")
    initial: str = options.option(
        LabelConfig.initial, help="'seeded': one per class chosen by --seed (manual: the C ACKMeans eigen-samples), "
                                  "or a CSV of keys (optional label column).")
    annotator: str = options.option(LabelConfig.annotator, type=click.Choice(["oracle", "manual"]))
    selector: str = options.option(LabelConfig.selector, type=click.Choice(["ackmeans", "random"]))
    method: str = options.option(LabelConfig.method, type=click.Choice(["ce", "coin", "bituning"]))
    epochs: int = options.option(LabelConfig.epochs, type=options.EPOCHS)
    seed: int = options.option(LabelConfig.seed, type=options.SEED)
    out: str = options.option(help="Output URI (state, requests, labels, models).", hashed=False)
    resume: bool = options.option(
        False, is_flag=True, hashed=False,
        help="Continue the run in --out with its stored config (other options may be left out).")


@click.command("label")
@options.options_from(LabelOptions)
@report_user_errors
def label_command(config: LabelOptions) -> None:
    """Progressive few-label transfer: ACKMeans selection, annotation and finetuning, round by round."""
    out = store.normalize(config.out)
    stored = store.join(out, stage.CONFIG)
    if config.resume:
        if not store.exists(stored):
            raise UserError(f"{out}: nothing to resume (no {stage.CONFIG})")
        cfg = LabelConfig.from_config(store.read_json(stored), out)
    else:
        missing = [name for name in ("init", "data") if not getattr(config, name)]
        if missing:
            raise UserError(f"missing --{' and --'.join(missing)} (or pass --resume to continue a run)")
        cfg = LabelConfig(**config.identity(), out=out)
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
        t = open_samples(cfg.test, target.images.samples.channels)  # its labels by class name, in the target's ids
        test = (Fitted(t, target.images.size), torch.from_numpy(labels_in_classes(target.classes, t, cfg.data)))
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
