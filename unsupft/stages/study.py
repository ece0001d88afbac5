"""`unsupft study`: the study page, one row per paper claim, from evaluate reports over seeds.

The last step of a study pipeline (jobs/study.yaml): `--report GROUP-REPLICATE=URI` for each
evaluate output (a `matrix` over seeds fans `report: {uft: eval-uft}` out to `uft-0`, `uft-1`, ...)
and `--claim NAME=SPEC` for each claim (syntax and verdict rule: `unsupft.eval.study`). Every report
is read and every claim checked against them before anything is written. Outputs: `study.json`
(the rows), `study.md`, `study.html` (with the chart inline), `config.json`, `_DONE.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from unsupft import options, stage, store
from unsupft.errors import UserError, report_user_errors
from unsupft.eval import study
from unsupft.eval.report import REPORT_JSON


def read_report(name: str, uri: str) -> dict:
    report_uri = store.join(store.normalize(uri), REPORT_JSON)
    if not store.exists(report_uri):
        raise UserError(f"--report {name}={uri}: not an evaluate output (no {REPORT_JSON})")
    return store.read_json(report_uri)


@dataclass(frozen=True, kw_only=True)
class StudyConfig(stage.StageOptions):
    report: tuple[str, ...] = options.option(
        multiple=True, metavar="GROUP-REPLICATE=URI",
        help="An evaluate output; reports named GROUP-<seed> are one group's replicates (repeatable).")
    claim: tuple[str, ...] = options.option(
        multiple=True, metavar="NAME=SPEC",
        help="'GROUP: MODEL vs BASELINE @ METRIC [| paper A vs B | paper +D] [| SOURCE]' (repeatable).")
    curve: tuple[str, ...] = options.option(
        (), multiple=True, metavar="NAME=SPEC", hashed="given",
        help="'GROUP: MODEL, MODEL @ METRIC': the metric against the number ending each MODEL-<n> (repeatable).")
    title: str = options.option("unsupft study", help="The page's title.")
    out: str = options.option(help="Output URI for study.md, study.html and study.json.", hashed=False)


@click.command("study")
@options.options_from(StudyConfig)
@report_user_errors
def study_command(config: StudyConfig) -> None:
    """One page with a row per paper claim: the paper's numbers, ours over seeds, the baseline, a verdict."""
    reports = options.parse_named(config.report, "--report")
    claims = [study.parse_claim(name, spec) for name, spec in options.parse_named(config.claim, "--claim").items()]
    curves = [study.parse_curve(name, spec) for name, spec in options.parse_named(config.curve, "--curve").items()]
    run = stage.start("study", store.normalize(config.out), config.identity(), inputs=reports)
    if run is None:
        return
    groups = study.replicate_groups({name: read_report(name, uri) for name, uri in reports.items()})
    for claim in claims:
        study.check_claim(claim, groups)
    lines = {curve.name: (curve.metric, study.curve_points(curve, groups)) for curve in curves}

    run.claim()
    rows = [study.score_claim(claim, groups) for claim in claims]
    store.write_json(store.join(run.out, study.STUDY_JSON), {"title": config.title, "rows": rows, "curves": lines, "reports": reports})
    store.write_text(store.join(run.out, study.STUDY_MD), study.render_md(config.title, rows, lines))
    store.write_text(store.join(run.out, study.STUDY_HTML), study.render_html(config.title, rows, lines))
    run.finish(claims=len(rows), verdicts={r["claim"]: r["verdict"] for r in rows})
    click.echo(json.dumps({r["claim"]: r["verdict"] for r in rows}), err=True)
    click.echo(f"{run.out}: study page written ({study.STUDY_MD}, {study.STUDY_HTML})", err=True)
