"""`unsupft annotate`: the web page on which a person labels a label stage's waiting round
(`unsupft.select.annotate_web`)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from unsupft import options, store
from unsupft.errors import report_user_errors
from unsupft.select.annotate_web import find_waiting_round, serve_round


@dataclass(frozen=True, kw_only=True)
class AnnotateConfig(options.Options):
    run_or_uri: str = options.option(argument=True)
    port: int = options.option(0, type=click.IntRange(0, 65535), help="0 = any free port")


@click.command("annotate")
@options.options_from(AnnotateConfig)
@report_user_errors
def annotate_command(config: AnnotateConfig) -> None:
    """Label the waiting round of a label stage (its --out URI, or a run prefix containing one)."""
    out, round_index = find_waiting_round(store.normalize(config.run_or_uri))
    serve_round(out, round_index, config.port)
