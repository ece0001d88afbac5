"""The study page: the papers' claims against our seeds, one row per claim (`unsupft study`).

A study reads evaluate reports (`report.json`, `unsupft.eval.report`) named `GROUP-REPLICATE`
(`uft-0`, `uft-1`: a pipeline `matrix` over seeds names them so) and claims written as one line:

    uft: uft vs pretrained @ fewshot_1_top1 | paper 0.62 vs 0.55 | UFT Table 2, 1-shot

that is `GROUP: MODEL vs BASELINE @ METRIC`, then optionally `| paper A vs B` (the paper's numbers
for the method and its baseline, `-` when it gives none) or `| paper +D` (a paper that states only
the method's lead over its baseline: "+2.57 points" is `paper +0.0257`; the sign is required), and
`| SOURCE` (where the paper says it). Papers report their own data at their own scale, so the page
sets the paper's lead (method minus baseline) beside ours: the direction compares, the size rarely.
METRIC is a column key of the evaluate report (`fewshot_4_top1`, `retrieval_top5`,
`cluster_bcubed_precision`, `sdbw`, `linear_top1`, `classifier_top1`; which way is better comes
from the report's column) or `round_N`, the test top-1 after round N of an evaluated label run
(`evaluate --label NAME=URI`). For each claim the study takes the value of MODEL and BASELINE in
every replicate of GROUP, and gives mean, std (over replicates, ddof 1) and n.

A curve (`--curve NAME=SPEC`, `GROUP: MODEL, MODEL @ METRIC`) plots the metric against the number
that ends each model's name in the reports (`hpt-40`, `hpt-120`: a matrix over `steps` names them
so), one line per MODEL, mean ± std over the replicates: HPT's convergence claim as a picture.

The verdict compares the method's lead over its baseline (in the paper's direction) with the seed
spread (the larger of the two stds): `reproduced` when the lead exceeds the spread, `contradicted`
when the baseline leads by more than the spread, else `not at this scale`. With one replicate there
is no spread: the verdict is `not at this scale` and the row says n = 1.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from unsupft.errors import UserError
from unsupft.eval.report import SCALAR_COLUMNS, _fmt, _pyplot, columns, figure_bytes, label_plot

REPRODUCED, NOT_AT_THIS_SCALE, CONTRADICTED = "reproduced", "not at this scale", "contradicted"
STUDY_MD, STUDY_HTML, STUDY_JSON = "study.md", "study.html", "study.json"

CLAIM_RE = re.compile(r"^\s*(?P<group>[a-z0-9][-a-z0-9]*)\s*:\s*(?P<model>\S+)\s+vs\s+(?P<baseline>\S+)\s*@\s*(?P<metric>\w+)\s*$")
PAPER_RE = re.compile(r"^\s*paper\s+(?P<ours>\S+)\s+vs\s+(?P<theirs>\S+)\s*$")
PAPER_LEAD_RE = re.compile(r"^\s*paper\s+(?P<lead>[+-]\S+)\s*$")
ROUND_RE = re.compile(r"^round_(\d+)$")
CURVE_RE = re.compile(r"^\s*(?P<group>[a-z0-9][-a-z0-9]*)\s*:\s*(?P<models>[^@]+?)\s*@\s*(?P<metric>\w+)\s*$")


@dataclass(frozen=True)
class Claim:
    name: str
    group: str
    model: str
    baseline: str
    metric: str
    paper: tuple[float | None, float | None]  # the paper's (method, baseline) numbers, None where not given
    source: str
    paper_lead: float | None  # the paper's method minus baseline: given (`paper +D`) or A - B


def _paper_number(text: str, claim: str) -> float | None:
    if text == "-":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--claim {claim}: the paper's number {text!r} is not a number (or '-')") from None


def parse_claim(name: str, spec: str) -> Claim:
    """`GROUP: MODEL vs BASELINE @ METRIC [| paper A vs B | paper +D] [| SOURCE]` -> a `Claim` (one line
    on error)."""
    head, *rest = [part.strip() for part in spec.split("|")]
    match = CLAIM_RE.match(head)
    if not match:
        raise UserError(f"--claim {name}: expected 'GROUP: MODEL vs BASELINE @ METRIC [| paper A vs B | paper +D] [| SOURCE]', got {spec!r}")
    paper: tuple[float | None, float | None] = (None, None)
    lead = None
    if rest and (numbers := PAPER_RE.match(rest[0])):
        rest.pop(0)
        paper = (_paper_number(numbers["ours"], name), _paper_number(numbers["theirs"], name))
        lead = None if None in paper else paper[0] - paper[1]
    elif rest and (given := PAPER_LEAD_RE.match(rest[0])):
        rest.pop(0)
        lead = _paper_number(given["lead"], name)
    if len(rest) > 1:
        raise UserError(f"--claim {name}: at most a 'paper A vs B' (or 'paper +D') part and a source after the claim, "
                        f"got {spec!r}")
    return Claim(name, match["group"], match["model"], match["baseline"], match["metric"], paper,
                 rest[0] if rest else "", lead)


@dataclass(frozen=True)
class Curve:
    name: str
    group: str
    models: tuple[str, ...]  # name prefixes: `hpt` plots hpt-40, hpt-120, ... against 40, 120
    metric: str


def parse_curve(name: str, spec: str) -> Curve:
    """`GROUP: MODEL, MODEL @ METRIC` -> a `Curve` (one line on error)."""
    match = CURVE_RE.match(spec)
    models = tuple(m.strip() for m in match["models"].split(",")) if match else ()
    if not match or not all(models):
        raise UserError(f"--curve {name}: expected 'GROUP: MODEL, MODEL @ METRIC', got {spec!r}")
    return Curve(name, match["group"], models, match["metric"])


def curve_points(curve: Curve, groups: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Per model prefix, (x, stats over replicates) for every report model named `<prefix>-<x>`;
    a curve with no point is refused (one line)."""
    if curve.group not in groups:
        raise UserError(f"--curve {curve.name}: no report of group '{curve.group}' (groups: {', '.join(sorted(groups))})")
    replicates = groups[curve.group].values()
    lines: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for prefix in curve.models:
        named = re.compile(re.escape(prefix) + r"-(\d+)$")
        xs = sorted({int(m[1]) for r in replicates for key in (r.get("models") or {}) if (m := named.match(key))})
        points = []
        for x in xs:
            values = [v for r in replicates if (v := metric_value(r, f"{prefix}-{x}", curve.metric)) is not None]
            if values:
                points.append((x, _stats(values)))
        if not points:
            raise UserError(f"--curve {curve.name}: no model '{prefix}-<number>' with {curve.metric} in group '{curve.group}'")
        lines[prefix] = points
    return lines


def replicate_groups(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Reports by group and replicate: `uft-0` -> group `uft`, replicate `0` (no '-': its own group)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for name, report in reports.items():
        group, _, replicate = name.rpartition("-")
        groups.setdefault(group or name, {})[replicate if group else ""] = report
    return groups


def higher_is_better(metric: str) -> bool:
    return next((higher for key, _, higher in SCALAR_COLUMNS if key == metric), True)


def metric_value(report: dict[str, Any], model: str, metric: str) -> float | None:
    """One model's value of a metric in one evaluate report (None when it does not have it)."""
    round_match = ROUND_RE.match(metric)
    if round_match:
        rounds = (report.get("label_curves") or {}).get(model) or []
        return next((r["test_top1"] for r in rounds if r["round"] == int(round_match[1])), None)
    result = (report.get("models") or {}).get(model)
    if result is None:
        return None
    column = next((c for c in columns({model: result}) if c.key == metric), None)
    return None if column is None else column.value(result)


def check_claim(claim: Claim, groups: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Refuse a claim that names a group, model or metric no report has (before anything is written)."""
    if claim.group not in groups:
        raise UserError(f"--claim {claim.name}: no report of group '{claim.group}' (groups: {', '.join(sorted(groups))})")
    for model in (claim.model, claim.baseline):
        if all(metric_value(r, model, claim.metric) is None for r in groups[claim.group].values()):
            known = sorted({m for r in groups[claim.group].values() for m in (*(r.get("models") or {}), *(r.get("label_curves") or {}))})
            raise UserError(f"--claim {claim.name}: no report of group '{claim.group}' has {claim.metric} for "
                            f"'{model}' (models: {', '.join(known)}; metrics: report column keys or round_N)")


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def verdict(ours: dict[str, Any], base: dict[str, Any], higher: bool) -> str:
    """reproduced / contradicted when the lead (in the paper's direction) is beyond the seed spread."""
    if min(ours["n"], base["n"]) < 2:
        return NOT_AT_THIS_SCALE
    lead = (ours["mean"] - base["mean"]) * (1 if higher else -1)
    spread = max(ours["std"], base["std"])
    if lead > spread:
        return REPRODUCED
    if lead < -spread:
        return CONTRADICTED
    return NOT_AT_THIS_SCALE


def score_claim(claim: Claim, groups: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The claim's row: the paper's numbers, ours and the baseline's over replicates, the verdict."""
    replicates = groups[claim.group]
    ours = [v for r in replicates.values() if (v := metric_value(r, claim.model, claim.metric)) is not None]
    base = [v for r in replicates.values() if (v := metric_value(r, claim.baseline, claim.metric)) is not None]
    ours_stats, base_stats = _stats(ours), _stats(base)
    higher = higher_is_better(claim.metric)
    return {"claim": claim.name, "group": claim.group, "model": claim.model, "baseline": claim.baseline,
            "metric": claim.metric, "higher_is_better": higher, "source": claim.source,
            "paper": {"model": claim.paper[0], "baseline": claim.paper[1], "lead": claim.paper_lead},
            "ours": ours_stats, "baseline_ours": base_stats, "lead_ours": ours_stats["mean"] - base_stats["mean"],
            "verdict": verdict(ours_stats, base_stats, higher)}


def _lead(row: dict[str, Any]) -> str:
    """`paper vs ours`: method minus baseline, signed (the metric column says which way is better)."""
    return " vs ".join("–" if v is None else f"{v:+.3f}" for v in (row["paper"]["lead"], row["lead_ours"]))


def _ours(stats: dict[str, Any]) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n']})"


def render_md(title: str, rows: list[dict[str, Any]], curves: dict | None = None) -> str:
    """study.md: one row per claim, then a table per curve."""
    lines = [f"# {title}", "",
             "Ours: mean ± std over replicates (seeds), n of them. Verdict: the method's lead over its baseline "
             "(in the paper's direction) against the larger seed std: reproduced / not at this scale / contradicted. "
             "Lead: method minus baseline, the paper's (on its own data and scale) and our mean: compare the signs, "
             "not the sizes.", "",
             "| claim | metric | paper: method vs baseline | lead: paper vs ours | ours: method | ours: baseline | "
             "verdict | source |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        direction = "" if r["higher_is_better"] else " (lower better)"
        lines.append(f"| {r['claim']} ({r['model']} vs {r['baseline']}) | {r['metric']}{direction} | "
                     f"{_fmt(r['paper']['model'])} vs {_fmt(r['paper']['baseline'])} | {_lead(r)} | "
                     f"{_ours(r['ours'])} | {_ours(r['baseline_ours'])} | {r['verdict']} | {r['source']} |")
    return "\n".join(lines) + "\n" + curves_md(curves or {})


def _svg(plt, fig) -> str:
    svg = figure_bytes(plt, fig, "svg").decode()
    return svg[svg.index("<svg"):]  # inline: without the XML prolog and doctype


def curve_svg(title: str, metric: str, lines: dict[str, list[tuple[int, dict[str, Any]]]]) -> str:
    """The metric against the number in the models' names (steps), mean ± std over replicates."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for prefix, points in lines.items():
        ax.errorbar([x for x, _ in points], [p["mean"] for _, p in points], yerr=[p["std"] for _, p in points],
                    marker="o", capsize=3, label=prefix)
    label_plot(ax, "the number in the model's name (e.g. pretraining steps)", metric, title)
    return _svg(plt, fig)


def curves_md(curves: dict[str, tuple[str, dict[str, list[tuple[int, dict[str, Any]]]]]]) -> str:
    """One small table per curve: x, then mean ± std (n) per model."""
    parts = []
    for name, (metric, lines) in curves.items():
        xs = sorted({x for points in lines.values() for x, _ in points})
        parts += ["", f"## {name}: {metric}", "", "| x | " + " | ".join(lines) + " |", "|---" * (len(lines) + 1) + "|"]
        for x in xs:
            cells = [next((_ours(p) for px, p in points if px == x), "–") for points in lines.values()]
            parts.append(f"| {x} | " + " | ".join(cells) + " |")
    return "\n".join(parts) + ("\n" if parts else "")


def claims_svg(rows: list[dict[str, Any]]) -> str:
    """One bar pair per claim (method, baseline: mean ± std, each seed a dot), as inline SVG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    for offset, key, label, colour in ((-0.2, "ours", "method", "#2a7ab0"), (0.2, "baseline_ours", "baseline", "#aaaaaa")):
        ax.bar(x + offset, [r[key]["mean"] for r in rows], 0.38, yerr=[r[key]["std"] for r in rows],
               capsize=3, color=colour, label=label)
        for i, r in enumerate(rows):
            ax.scatter([i + offset] * r[key]["n"], r[key]["values"], s=8, color="black", zorder=3)
    ax.set_xticks(x, [r["claim"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("metric value (mean ± std, dots: seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _svg(plt, fig)


def render_html(title: str, rows: list[dict[str, Any]], curves: dict | None = None) -> str:
    """study.html: the table of study.md with the verdicts coloured, the bar chart and the curves inline."""
    colour = {REPRODUCED: "#e3f4e1", NOT_AT_THIS_SCALE: "#f6f1dc", CONTRADICTED: "#f6dede"}
    esc = html.escape
    body = "".join(
        f"<tr><td class=name>{esc(r['claim'])}<br><small>{esc(r['model'])} vs {esc(r['baseline'])}</small></td>"
        f"<td class=name>{esc(r['metric'])}{'' if r['higher_is_better'] else ' (lower better)'}</td>"
        f"<td>{_fmt(r['paper']['model'])} vs {_fmt(r['paper']['baseline'])}</td><td>{_lead(r)}</td>"
        f"<td>{esc(_ours(r['ours']))}</td>"
        f"<td>{esc(_ours(r['baseline_ours']))}</td><td style=\"background:{colour[r['verdict']]}\">{esc(r['verdict'])}</td>"
        f"<td class=name>{esc(r['source'])}</td></tr>" for r in rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}td.name{{text-align:left}}th{{background:#eee}}</style>
</head><body><h1>{esc(title)}</h1>
<p>Ours: mean ± std over seeds (n). Verdict: the method's lead over its baseline in the paper's direction,
against the larger seed std. Lead: method minus baseline, the paper's (on its own data and scale) and our
mean: compare the signs, not the sizes.</p>
<table><tr><th>claim</th><th>metric</th><th>paper: method vs baseline</th><th>lead: paper vs ours</th><th>ours: method</th>
<th>ours: baseline</th><th>verdict</th><th>source</th></tr>{body}</table>
<figure>{claims_svg(rows) if rows else ""}<figcaption>each claim: method and baseline, mean ± std over seeds, dots: single seeds</figcaption></figure>
{"".join(f"<figure>{curve_svg(name, metric, lines)}<figcaption>{esc(name)}: {esc(metric)}, mean ± std over seeds</figcaption></figure>"
         for name, (metric, lines) in (curves or {}).items())}
</body></html>
"""
