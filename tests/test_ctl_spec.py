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
    assert_one_line_error(GOOD, change, "demo.yaml", expected)


def assert_one_line_error(original: str, change: tuple[str, str], file: str, expected: str | None) -> None:
    """`original` with `change` applied is refused with one line holding `expected` (None: accepted)."""
    text = original.replace(*change)
    assert text != original
    if expected is None:
        spec.parse(text, file)
        return
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


# ------------------------------------------------------------------------------------ matrix ---

MATRIX = """\
name: m
datasets: {digits: file:///data/digits}
stages:
  base: {kind: pretrain, data: [digits], steps: 20, matrix: {seed: [0, 1]}}
  adapt:
    kind: adapt
    init: base
    target: digits
    matrix: {seed: [0, 1], mix: [none, cutmix]}
  eval: {kind: evaluate, model: {base: base, adapt: adapt}, train: digits, test: digits, matrix: {seed: [0, 1]}}
  all: {kind: evaluate, model: {base: base, data: digits}, train: digits, test: digits}
  study: {kind: study, report: {uft: eval}, claim: {c: "uft: adapt-cutmix vs base @ fewshot_1_top1"}}
resources:
  base: {cpu: 3}
"""


def test_matrix_expands_names_and_sets_each_axis():
    p = spec.parse(MATRIX, "m.yaml")
    assert [s for s in p.stages if s.startswith("adapt")] == ["adapt-0-none", "adapt-0-cutmix", "adapt-1-none", "adapt-1-cutmix"]
    assert "base" not in p.stages and "adapt" not in p.stages
    assert p.stages["base-1"].params["seed"] == 1
    assert p.stages["adapt-1-cutmix"].params["seed"] == 1 and p.stages["adapt-1-cutmix"].params["mix"] == "cutmix"
    assert p.stages["base-0"].resources.cpu == 3 and p.stages["adapt-0-none"].resources.cpu == 1  # per written stage
    check_options(p, "m.yaml")  # the axes are options of their kind, with values it accepts


def test_matrix_binds_shared_axes_and_fans_out_the_others():
    p = spec.parse(MATRIX, "m.yaml")
    assert p.stages["adapt-1-none"].params["init"] == "stage:base-1"  # shared axis seed: same value
    assert p.stages["eval-1"].params["model"] == {"base": "stage:base-1", "adapt-none": "stage:adapt-1-none",
                                                  "adapt-cutmix": "stage:adapt-1-cutmix"}
    assert p.stages["all"].params["model"] == {"base-0": "stage:base-0", "base-1": "stage:base-1",
                                               "data": "/data/digits"}  # no shared axis: every expansion
    assert p.stages["study"].params["report"] == {"uft-0": "stage:eval-0", "uft-1": "stage:eval-1"}
    assert p.stages["study"].needs == ("eval-0", "eval-1")
    listed = spec.parse(MATRIX.replace("data: [digits], steps: 20", "data: [digits], steps: 20, init: x")
                        .replace("datasets: {digits: file:///data/digits}", "datasets: {digits: file:///data/digits, x: file:///x}")
                        .replace("  all: {kind: evaluate", "  hpt: {kind: pretrain, data: [base, digits]}\n  all: {kind: evaluate"), "m.yaml")
    assert listed.stages["hpt"].params["data"] == ["stage:base-0", "stage:base-1", "/data/digits"]


def test_matrix_float_and_boolean_values_make_names():
    text = MATRIX.replace("matrix: {seed: [0, 1], mix: [none, cutmix]}", "matrix: {lr: [0.03, 0.1], seed: [0, 1]}")
    p = spec.parse(text, "m.yaml")
    assert "adapt-0-03-1" in p.stages and p.stages["adapt-0-03-1"].params["lr"] == 0.03


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
    assert_one_line_error(CHOSEN, change, "pick.yaml", expected)


@pytest.mark.parametrize(
    "change, expected",
    [
        (("matrix: {seed: [0, 1]}}\n  adapt", "matrix: [0, 1]}\n  adapt"),
         "m.yaml:4: stages.base.matrix: a matrix is a mapping"),
        (("matrix: {seed: [0, 1], mix", "matrix: {sed: [0, 1], mix"),
         "m.yaml:9: stages.adapt.matrix.sed: 'adapt' has no option --sed"),
        (("matrix: {seed: [0, 1], mix", "matrix: {target: [0, 1], mix"),
         "m.yaml:9: stages.adapt.matrix.target: an input cannot be a matrix axis"),
        (("mix: [none, cutmix]", "mix: []"), "m.yaml:9: stages.adapt.matrix.mix: expected a non-empty list"),
        (("mix: [none, cutmix]", "mix: none"), "m.yaml:9: stages.adapt.matrix.mix: expected a non-empty list"),
        (("mix: [none, cutmix]", "mix: [none, [cutmix]]"), "m.yaml:9: stages.adapt.matrix.mix[1]: a matrix value is a scalar"),
        (("    target: digits\n", "    target: digits\n    seed: 3\n"),
         "m.yaml:10: stages.adapt.matrix.seed: given both as a parameter and as a matrix axis"),
        (("mix: [none, cutmix]", "mix: [cut.mix, cut-mix]"), "m.yaml:9: stages.adapt.matrix: the expansion 'adapt-0-cut-mix' collides"),
        (("  all: {kind", "  base-1: {kind: pretrain, data: [digits]}\n  all: {kind"),
         "m.yaml:4: stages.base.matrix: the expansion 'base-1' collides"),
        (("mix: [none, cutmix]", "mix: [none, cutmix-with-a-very-long-name-indeed-x]"),
         "m.yaml:9: stages.adapt.matrix: the expansion 'adapt-0-cutmix-with-a-very-long-name-indeed-x' is not a stage name"),
        (("matrix: {seed: [0, 1], mix", "matrix: {seed: [0, 1, 2], mix"),
         "m.yaml:7: stages.adapt.init: seed 2 of this stage is not a value of base's matrix axis seed (0, 1)"),
        (("    init: base\n", "    init: base\n    replay_source: base\n"),
         None),  # shared axis: binds to one expansion
        (("matrix: {seed: [0, 1], mix: [none, cutmix]}", "matrix: {mix: [none, cutmix]}"),
         "m.yaml:7: stages.adapt.init: base is a matrix over seed, which this stage does not share"),
    ],
)
def test_matrix_errors_name_file_field_and_line(change, expected):
    assert_one_line_error(MATRIX, change, "m.yaml", expected)


def test_matrix_cache_keys_differ_per_expansion():
    from unsupft.ctl.command import stage_keys

    keys = stage_keys(spec.parse(MATRIX, "m.yaml"), "/r")
    assert len({keys["base-0"], keys["base-1"]}) == 2
    assert keys["adapt-0-none"] == stage_keys(spec.parse(MATRIX, "m.yaml"), "/r")["adapt-0-none"]


def test_matrix_expansions_become_kubernetes_objects():
    """The kube backend needs no change: it renders the expanded stages like any others."""
    from unsupft.ctl import kube

    p = spec.parse(MATRIX.replace("file:///data/digits", "s3://bucket/digits").replace("name: m", "name: m\nstore: s3://bucket/runs"), "m.yaml")
    objs = kube.render(p, kube.Context(p.name, "ml", "creds"), "img:1")
    rendered = {o["metadata"]["labels"].get(kube.LABEL_STAGE) for o in objs}
    assert {"base-0", "base-1", "adapt-1-cutmix", "eval-0", "study"} <= rendered


def test_matrix_too_many_stages_is_refused_before_expanding():
    many = MATRIX.replace("matrix: {seed: [0, 1]}}\n  adapt", "matrix: {seed: [" + ", ".join(map(str, range(40))) + "],"
                          " lr: [" + ", ".join(f"0.{i + 1}" for i in range(30)) + "]}}\n  adapt")
    with pytest.raises(UserError, match=r"m.yaml:3: stages: the matrices make 1208 stages; a pipeline holds at most 1000"):
        spec.parse(many, "m.yaml")
