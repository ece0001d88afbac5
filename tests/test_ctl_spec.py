"""Pipeline files: valid ones parse into a DAG; every kind of mistake is one line naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unsupft.ctl import spec
from unsupft.ctl.command import check_options, stage_args
from unsupft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: demo
store: file:///tmp/unsupft-store
datasets:
  digits: file:///data/digits
stages:
  naive: {kind: adapt, init: base, target: digits, mix: none}
  base: {kind: pretrain, data: [digits], arch: tiny, steps: 20}
  adapt: {kind: adapt, init: base, target: digits, replay_source: digits, replay_fraction: 0.1, mix: cutmix}
  eval: {kind: evaluate, model: {adapt: adapt, naive: naive}, train: digits, test: digits, shots: [1, 2]}
  lab: {kind: label, init: base, data: digits, resume: true}
resources:
  defaults: {cpu: 2, memory: 4Gi}
  base: {gpus: 4, nodes: 2, procs_per_node: 4}
"""


def test_good_pipeline_orders_stages_and_maps_parameters():
    p = spec.parse(GOOD, "demo.yaml")
    order = list(p.stages)
    assert order.index("base") < order.index("naive") < order.index("eval")
    assert order.index("adapt") < order.index("eval")
    assert p.stages["eval"].needs == ("adapt", "naive")
    assert p.stages["base"].resources.processes == 8 and p.stages["base"].resources.cpu == 2
    assert p.stages["naive"].resources.gpus == 0
    args = stage_args(p.stages["adapt"], "/s/runs/r")
    assert args == ["adapt", "--init", "/s/runs/r/base", "--target", "/data/digits", "--replay-source", "/data/digits",
                    "--replay-fraction", "0.1", "--mix", "cutmix", "--out", "/s/runs/r/adapt"]
    assert stage_args(p.stages["lab"], "/r")[-3] == "--resume"  # true -> the flag
    ev = stage_args(p.stages["eval"], "/r")
    assert ev[1:5] == ["--model", "adapt=/r/adapt", "--model", "naive=/r/naive"]
    assert ev[ev.index("--shots") + 1] == "1,2"  # evaluate's --shots takes one comma list
    check_options(p, "demo.yaml")


def test_parameters_are_checked_against_the_stage_commands():
    """Option errors name the file and the line of the value, like the spec's own errors."""
    with pytest.raises(UserError, match="demo.yaml:7: stages.base.colour: 'pretrain' has no option --colour"):
        check_options(spec.parse(GOOD.replace("arch: tiny", "arch: tiny, colour: red"), "demo.yaml"), "demo.yaml")
    with pytest.raises(UserError, match="demo.yaml:8: stages.adapt.mix: 'blend' is not one of 'cutmix', 'mixup', 'none'"):
        check_options(spec.parse(GOOD.replace("mix: cutmix", "mix: blend"), "demo.yaml"), "demo.yaml")
    with pytest.raises(UserError, match="demo.yaml:10: stages.lab.resume: expected true or false"):
        check_options(spec.parse(GOOD.replace("resume: true", "resume: 3"), "demo.yaml"), "demo.yaml")
    block = GOOD.replace("steps: 20}", "steps: 20,\n         lr: -1}")  # a value on a line of its own
    with pytest.raises(UserError, match=r"demo.yaml:8: stages.base.lr: -1.0 is not in the range"):
        check_options(spec.parse(block, "demo.yaml"), "demo.yaml")


@pytest.mark.parametrize(
    "change, expected",
    [
        (("  base: {kind: pretrain,", "  base: {kind: pretrain, colour: red,"), None),  # unknown param: fine until options are checked
        (("resources:", "resource:"), "demo.yaml:11: resource: unknown field"),
        (("  base: {gpus: 4,", "  base: {gpu: 4,"), "demo.yaml:13: resources.base.gpu: unknown field"),
        (("{cpu: 2,", "{cpu: [2],"), "demo.yaml:12: resources.defaults.cpu: expected int/float/str"),
        (("nodes: 2", "nodes: 0"), "demo.yaml:13: resources.base.nodes: out of range"),
        (("init: base, target: digits, mix", "init: bsae, target: digits, mix"), "demo.yaml:6: stages.naive.init: unknown reference 'bsae'"),
        (("data: [digits]", "data: [digits, digts]"), "demo.yaml:7: stages.base.data[1]: unknown reference 'digts'"),
        (("kind: evaluate", "kind: evaluation"), "demo.yaml:9: stages.eval.kind: kind must be one of"),
        (("data: [digits], arch", "data: [digits], init: eval, arch"), "cycle: "),
        (("steps: 20}", "steps: 20, out: x}"), "demo.yaml:7: stages.base.out: the controller sets"),
        (("name: demo", "name: Demo_1"), "demo.yaml:1: name: pipeline name 'Demo_1'"),
        (("  digits: file:///data/digits", "  digits: [1]"), "demo.yaml:4: datasets.digits: expected a URI"),
        (("arch: tiny", "arch: {a: [1]}"), "demo.yaml:7: stages.base.arch: a parameter is"),
        (("name: demo", "name: demo\nname: again"), "demo.yaml:2: name: duplicate key"),
        (("stages:", "stages: ["), "demo.yaml"),
    ],
)
def test_errors_name_file_field_and_line(change, expected):
    text = GOOD.replace(*change)
    assert text != GOOD
    if expected is None:
        spec.parse(text, "demo.yaml")
        return
    _assert_one_line_error(text, "demo.yaml", expected)


def _assert_one_line_error(text: str, file: str, expected: str) -> None:
    with pytest.raises(UserError) as err:
        spec.parse(text, file)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_cli_exit_codes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    ok = subprocess.run([sys.executable, "-m", "unsupft.ctl", "validate", str(good)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "5 stages" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("replay_fraction: 0.1", "replay_fraction: 0.1, init: nowhere"))
    res = subprocess.run([sys.executable, "-m", "unsupft.ctl", "validate", str(bad)], env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "stages.adapt.init" in res.stderr and "bad.yaml:8" in res.stderr


CHOSEN = """\
name: pick
store: file:///tmp/unsupft-store
datasets: {a: file:///data/a, b: file:///data/b, tgt: file:///data/tgt}
stages:
  base: {kind: pretrain, data: [a], arch: tiny, steps: 20}
  choose: {kind: select-source, init: base, candidate: {a: a, b: b}, probe_train: tgt, shots: 2}
  source: {kind: pretrain, init: base, data: [choose.chosen], target: tgt, steps: 20}
"""


def test_chosen_source_reference_renders_a_marker_the_stage_resolves():
    """`choose.chosen` depends on the select-source stage and renders `chosen:<its output URI>`, the
    same command line for every backend, written before the choice exists."""
    p = spec.parse(CHOSEN, "pick.yaml")
    assert p.stages["source"].needs == ("base", "choose")
    assert list(p.stages).index("choose") < list(p.stages).index("source")
    args = stage_args(p.stages["source"], "s3://bucket/runs/r")
    assert args[args.index("--data") + 1] == "chosen:s3://bucket/runs/r/choose"
    check_options(p, "pick.yaml")


@pytest.mark.parametrize(
    "change, expected",
    [
        (("data: [choose.chosen]", "data: [chose.chosen]"), "pick.yaml:7: stages.source.data[0]: unknown reference 'chose.chosen' (no stage 'chose'"),
        (("data: [choose.chosen]", "data: [base.chosen]"), "pick.yaml:7: stages.source.data[0]: 'base.chosen': stage 'base' is a 'pretrain' stage"),
        (("init: base, data: [choose", "init: choose.chosen, data: [choose"), "pick.yaml:7: stages.source.init: 'choose.chosen' is a data set, and 'pretrain' takes no data set as init (its data-set inputs: data, target"),
        (("candidate: {a: a, b: b}", "candidate: {a: a, b: choose.chosen}"), "pick.yaml:6: stages.choose.candidate.b: 'choose.chosen' is a data set, and 'select-source' takes no data set as candidate"),
        (("probe_train: tgt", "probe_train: choose.chosen"), "pick.yaml:6: stages.choose.probe_train: a stage cannot read its own output"),
        (("data: [choose.chosen]", "data: [choose.picked]"), "unknown reference 'choose.picked'"),
    ],
)
def test_chosen_source_reference_errors_name_file_field_and_line(change, expected):
    text = CHOSEN.replace(*change)
    assert text != CHOSEN
    _assert_one_line_error(text, "pick.yaml", expected)
