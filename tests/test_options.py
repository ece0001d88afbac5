"""Numeric options refuse NaN, infinities and out-of-range values (one line, exit 2), and the
static option table the controller validates pipelines with matches the stage commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from unsupft import options
from unsupft.cli import main as unsupft_main

ROOT = Path(__file__).resolve().parents[1]


def test_the_static_table_matches_the_stage_commands():
    # After changing a stage's options: `make options-table`.
    assert options.load() == options.generate()
    assert options.TABLE.read_text() == options.render(options.generate())


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_number_refuses_non_finite(value):
    with pytest.raises(Exception, match="not a finite number"):
        options.LEARNING_RATE.convert(value, None, None)


def test_table_types_are_the_stage_types():
    # The controller's copy of a type accepts and refuses exactly what the stage's does.
    lr = options.param_type(options.load()["pretrain"]["lr"]["type"])
    assert isinstance(lr, options.Number) and lr.convert("0.5", None, None) == 0.5
    for bad in ("0", "-1", "nan", "101"):
        with pytest.raises(Exception):
            lr.convert(bad, None, None)
    steps = options.param_type(options.load()["pretrain"]["steps"]["type"])
    with pytest.raises(Exception, match="1<=x<=100000000"):
        steps.convert(10**20, None, None)
    with pytest.raises(Exception, match="not an integer"):
        steps.convert(True, None, None)


@pytest.mark.parametrize("args, needle", [
    (["pretrain", "--data", "d", "--out", "o", "--lr", "nan"], "'--lr': 'nan' is not a finite number"),
    (["pretrain", "--data", "d", "--out", "o", "--temperature", "nan"], "'--temperature': 'nan' is not a finite"),
    (["pretrain", "--data", "d", "--out", "o", "--lr", "-1"], "0<x<=100"),
    (["pretrain", "--data", "d", "--out", "o", "--queue-size", "1000000000"], "1<=x<=1048576"),
    (["pretrain", "--data", "d", "--out", "o", "--image-size", "100000"], "8<=x<=1024"),
    (["pretrain", "--data", "d", "--out", "o", "--steps", "0"], "1<=x<=100000000"),
    (["transfer", "--init", "i", "--train", "t", "--out", "o", "--lr-head", "nan"], "'--lr-head': 'nan'"),
    (["adapt", "--init", "i", "--target", "t", "--out", "o", "--key-momentum", "1"], "0<=x<1"),
    (["pretrain", "--no-such-option"], "No such option"),
])
def test_click_range_errors_are_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(unsupft_main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_validate_checks_values_without_importing_torch(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nstages:\n  a: {kind: pretrain, data: [/x], steps: 0}\n")
    code = ("import sys\nfrom unsupft.ctl.cli import main\ntry:\n    main(['validate', sys.argv[1]])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["2", "False"], out
    assert "stages.a.steps: 0 is not in the range 1<=x<=100000000" in out.stderr
