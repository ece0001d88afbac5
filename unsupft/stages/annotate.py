"""`unsupft annotate`: the web page on which a person labels a label stage's waiting round
(`unsupft.select.annotate_web`)."""

from __future__ import annotations

import click

from unsupft import store
from unsupft.errors import report_user_errors
from unsupft.select.annotate_web import find_waiting_round, serve_round


@click.command("annotate")
@click.argument("run_or_uri")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 = any free port")
@report_user_errors
def annotate_command(run_or_uri: str, port: int) -> None:
    """Label the waiting round of a label stage (its --out URI, or a run prefix containing one)."""
    out, round_index = find_waiting_round(store.normalize(run_or_uri))
    serve_round(out, round_index, port)
