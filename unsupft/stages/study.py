"""`unsupft study`: the study page, one row per paper claim, from evaluate reports over seeds.

The last step of a study pipeline (jobs/study.yaml): `--report GROUP-REPLICATE=URI` for each
evaluate output (a `matrix` over seeds fans `report: {uft: eval-uft}` out to `uft-0`, `uft-1`, ...)
and `--claim NAME=SPEC` for each claim (syntax and verdict rule: `unsupft.eval.study`). Every report
is read and every claim checked against them before anything is written. Outputs: `study.json`
(the rows), `study.md`, `study.html` (with the chart inline), `config.json`, `_DONE.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from unsupft import stage, store
from unsupft.errors import UserError, report_user_errors
from unsupft.eval import study
from unsupft.eval.report import REPORT_JSON
from unsupft.stages.evaluate import parse_named


def read_report(name: str, uri: str) -> dict:
    report_uri = store.join(store.normalize(uri), REPORT_JSON)
    if not store.exists(report_uri):
        raise UserError(f"--report {name}={uri}: not an evaluate output (no {REPORT_JSON})")
    return store.read_json(report_uri)


@click.command("study")
@click.option("--report", "report_specs", multiple=True, required=True, metavar="GROUP-REPLICATE=URI",
              help="An evaluate output; reports named GROUP-<seed> are one group's replicates (repeatable).")
@click.option("--claim", "claim_specs", multiple=True, required=True, metavar="NAME=SPEC",
              help="'GROUP: MODEL vs BASELINE @ METRIC [| paper A vs B] [| SOURCE]' (repeatable).")
@click.option("--curve", "curve_specs", multiple=True, metavar="NAME=SPEC",
              help="'GROUP: MODEL, MODEL @ METRIC': the metric against the number ending each MODEL-<n> (repeatable).")
@click.option("--title", default="unsupft study", show_default=True, help="The page's title.")
@click.option("--out", required=True, help="Output URI for study.md, study.html and study.json.")
@stage.overwrite_option
@report_user_errors
def study_command(report_specs: tuple[str, ...], claim_specs: tuple[str, ...], curve_specs: tuple[str, ...], title: str,
                  out: str) -> None:
    """One page with a row per paper claim: the paper's numbers, ours over seeds, the baseline, a verdict."""
    reports = parse_named(report_specs, "--report")
    claims = [study.parse_claim(name, spec) for name, spec in parse_named(claim_specs, "--claim").items()]
    curves = [study.parse_curve(name, spec) for name, spec in parse_named(curve_specs, "--curve").items()]
    run = stage.start("study", store.normalize(out), {
        "reports": reports, "claims": [asdict(c) for c in claims], "title": title,
        **({"curves": [asdict(c) for c in curves]} if curves else {})}, inputs=reports)
    if run is None:
        return
    groups = study.replicate_groups({name: read_report(name, uri) for name, uri in reports.items()})
    for claim in claims:
        study.check_claim(claim, groups)
    lines = {curve.name: (curve.metric, study.curve_points(curve, groups)) for curve in curves}

    run.claim()
    rows = [study.score_claim(claim, groups) for claim in claims]
    store.write_json(store.join(run.out, study.STUDY_JSON), {"title": title, "rows": rows, "curves": lines, "reports": reports})
    store.write_text(store.join(run.out, study.STUDY_MD), study.render_md(title, rows, lines))
    store.write_text(store.join(run.out, study.STUDY_HTML), study.render_html(title, rows, lines))
    run.finish(claims=len(rows), verdicts={r["claim"]: r["verdict"] for r in rows})
    click.echo(json.dumps({r["claim"]: r["verdict"] for r in rows}), err=True)
    click.echo(f"{run.out}: study page written ({study.STUDY_MD}, {study.STUDY_HTML})", err=True)
