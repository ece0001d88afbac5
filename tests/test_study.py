"""The study page: claim syntax, verdict rule, and a 2-seed matrix pipeline on digits end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unsupft.errors import UserError
from unsupft.eval import study

ROOT = Path(__file__).resolve().parents[1]


def _report(values: dict[str, float], metric: str = "linear_top1") -> dict:
    return {"models": {name: {metric: v} for name, v in values.items()}}


def test_claim_syntax():
    claim = study.parse_claim("c", "uft: a vs b @ fewshot_1_top1 | paper 0.62 vs - | UFT Table 2")
    assert (claim.group, claim.model, claim.baseline, claim.metric) == ("uft", "a", "b", "fewshot_1_top1")
    assert claim.paper == (0.62, None) and claim.source == "UFT Table 2"
    assert claim.paper_lead is None  # one number missing: no lead
    assert study.parse_claim("c", "g: a vs b @ sdbw").paper == (None, None)
    assert study.parse_claim("c", "g: a vs b @ x | paper 0.62 vs 0.55").paper_lead == pytest.approx(0.07)
    # a paper that states only the gain: `paper +D` (sign required), no method/baseline numbers
    lead_only = study.parse_claim("c", "g: a vs b @ x | paper +0.0257 | COIN abstract")
    assert (lead_only.paper, lead_only.paper_lead, lead_only.source) == ((None, None), 0.0257, "COIN abstract")
    assert study.parse_claim("c", "g: a vs b @ sdbw | paper -0.5").paper_lead == -0.5
    assert study.parse_claim("c", "g: a vs b @ x | paper 0.03").source == "paper 0.03"  # unsigned: a source text
    for bad in ("a vs b @ x", "g: a b @ x", "g: a vs b @ x | paper x vs 1", "g: a vs b @ x | s | t",
                "g: a vs b @ x | paper +x", "g: a vs b @ x | paper +0.1 | s | t"):
        with pytest.raises(UserError, match="--claim c: "):
            study.parse_claim("c", bad)


@pytest.mark.parametrize("method, baseline, metric, expected", [
    ([0.60, 0.62, 0.61], [0.50, 0.52, 0.51], "linear_top1", study.REPRODUCED),  # lead 0.10 >> std 0.01
    ([0.50, 0.52, 0.51], [0.60, 0.62, 0.61], "linear_top1", study.CONTRADICTED),
    ([0.60, 0.40, 0.50], [0.52, 0.48, 0.50], "linear_top1", study.NOT_AT_THIS_SCALE),  # within the spread
    ([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], "sdbw", study.REPRODUCED),  # S_Dbw: lower is better
    ([0.9], [0.1], "linear_top1", study.NOT_AT_THIS_SCALE),  # one seed: no spread, no verdict
])
def test_verdict_is_the_lead_against_the_seed_spread(method, baseline, metric, expected):
    reports = {f"g-{i}": _report({"m": a, "b": b}, metric) for i, (a, b) in enumerate(zip(method, baseline))}
    row = study.score_claim(study.parse_claim("c", f"g: m vs b @ {metric}"), study.replicate_groups(reports))
    assert row["verdict"] == expected
    assert row["ours"]["n"] == len(method) and row["ours"]["mean"] == pytest.approx(sum(method) / len(method))


def test_claims_naming_what_no_report_has_are_refused():
    groups = study.replicate_groups({"g-0": _report({"m": 0.5, "b": 0.4}), "g-1": _report({"m": 0.5, "b": 0.4})})
    for spec, message in (("h: m vs b @ linear_top1", "no report of group 'h'"),
                          ("g: m vs x @ linear_top1", "has linear_top1 for 'x'"),
                          ("g: m vs b @ retrieval_top5", "has retrieval_top5 for 'm'")):
        with pytest.raises(UserError, match=message):
            study.check_claim(study.parse_claim("c", spec), groups)


def test_page_sets_the_papers_lead_beside_ours():
    reports = {f"g-{i}": _report({"m": 0.60 + i / 100, "b": 0.50}) for i in range(2)}
    groups = study.replicate_groups(reports)
    rows = [study.score_claim(study.parse_claim("given", "g: m vs b @ linear_top1 | paper 0.70 vs 0.80 | T1"), groups),
            study.score_claim(study.parse_claim("gain", "g: m vs b @ linear_top1 | paper +0.107 | abstract"), groups),
            study.score_claim(study.parse_claim("none", "g: m vs b @ linear_top1"), groups)]
    assert rows[0]["paper"]["lead"] == pytest.approx(-0.10) and rows[0]["lead_ours"] == pytest.approx(0.105)
    page = study.render_md("t", rows)
    assert "| given (m vs b) | linear_top1 | 0.700 vs 0.800 | -0.100 vs +0.105 |" in page
    assert "| gain (m vs b) | linear_top1 | – vs – | +0.107 vs +0.105 |" in page
    assert "| none (m vs b) | linear_top1 | – vs – | – vs +0.105 |" in page
    assert "<td>+0.107 vs +0.105</td>" in study.render_html("t", rows)


def test_label_rounds_are_a_metric():
    report = {"label_curves": {"ack": [{"round": 0, "labels": 10, "test_top1": 0.3}, {"round": 1, "labels": 20, "test_top1": 0.5}]}}
    assert study.metric_value(report, "ack", "round_1") == 0.5
    assert study.metric_value(report, "ack", "round_2") is None


def test_study_pipeline_on_digits_with_two_seeds(tmp_path, ingest):
    """A matrix over two seeds (pretrain, adapt, evaluate) and the study step, through `unsupft-ctl run`."""
    ingest("sklearn:digits", tmp_path / "digits", "--limit", "300", "--split", "0.3", "--seed", "1")
    pipeline = tmp_path / "study.yaml"
    pipeline.write_text(f"""\
name: mini
store: file://{tmp_path}/store
datasets: {{train: file://{tmp_path}/digits/train, test: file://{tmp_path}/digits/test}}
stages:
  base: {{kind: pretrain, data: [train], arch: tiny, steps: 4, batch_size: 32, queue_size: 64, matrix: {{seed: [0, 1]}}}}
  naive: {{kind: adapt, init: base, target: train, mix: none, replay_fraction: 0.0, steps: 3, batch_size: 32,
          queue_size: 64, matrix: {{seed: [0, 1]}}}}
  eval: {{kind: evaluate, model: {{base: base, naive: naive}}, train: train, test: test, shots: [1], trials: 1,
         epochs: 3, metrics: [fewshot, retrieval], matrix: {{seed: [0, 1]}}}}
  study:
    kind: study
    report: {{digits: eval}}
    claim:
      adapt-1shot: "digits: naive vs base @ fewshot_1_top1 | paper 0.60 vs 0.50 | UFT Table 2"
      adapt-retrieval: "digits: naive vs base @ retrieval_top5"
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "unsupft.ctl", "run", str(pipeline)], env=env, capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "store/runs/mini/study"
    rows = {r["claim"]: r for r in json.loads((out / "study.json").read_text())["rows"]}
    for seed in (0, 1):  # each seed's report, read back, gives the row's values
        report = json.loads((tmp_path / f"store/runs/mini/eval-{seed}/report.json").read_text())
        assert rows["adapt-retrieval"]["ours"]["values"][seed] == report["models"]["naive"]["retrieval_top5"]
        assert rows["adapt-retrieval"]["baseline_ours"]["values"][seed] == report["models"]["base"]["retrieval_top5"]
    for row in rows.values():
        assert row["ours"]["n"] == 2
        lead = row["ours"]["mean"] - row["baseline_ours"]["mean"]
        spread = max(row["ours"]["std"], row["baseline_ours"]["std"])
        assert row["verdict"] == (study.REPRODUCED if lead > spread else study.CONTRADICTED if lead < -spread
                                  else study.NOT_AT_THIS_SCALE)
    page = (out / "study.md").read_text()
    assert "| adapt-1shot (naive vs base) | fewshot_1_top1 | 0.600 vs 0.500 | +0.100 vs " in page
    assert f"(n=2) | {rows['adapt-1shot']['verdict']} | UFT Table 2 |" in page
    assert "<svg" in (out / "study.html").read_text()


def test_curve_plots_a_metric_against_the_number_in_the_model_names():
    reports = {f"hpt-{seed}": _report({"hpt-40": 0.5 + seed / 10, "hpt-120": 0.7, "hpt-bn-40": 0.4, "scratch-40": 0.3})
               for seed in (0, 1)}
    curve = study.parse_curve("steps", "hpt: hpt, scratch @ linear_top1")
    lines = study.curve_points(curve, study.replicate_groups(reports))
    assert [x for x, _ in lines["hpt"]] == [40, 120]  # hpt-bn-40 is not a point of hpt
    assert lines["hpt"][0][1]["mean"] == pytest.approx(0.55) and lines["hpt"][0][1]["n"] == 2
    assert [x for x, _ in lines["scratch"]] == [40]
    assert "| 40 | 0.550 ± 0.071 (n=2) | 0.300 ± 0.000 (n=2) |" in study.curves_md({"steps": ("linear_top1", lines)})
    assert "<svg" in study.curve_svg("steps", "linear_top1", lines)
    with pytest.raises(UserError, match="no model 'base-<number>'"):
        study.curve_points(study.parse_curve("s", "hpt: base @ linear_top1"), study.replicate_groups(reports))
    with pytest.raises(UserError, match="--curve s: expected"):
        study.parse_curve("s", "hpt: @ linear_top1")
