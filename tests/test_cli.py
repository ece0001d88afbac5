"""The `unsupft` command surface: options from the environment, help text and examples."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from unsupft.cli import STAGES, main
from unsupft.models import build_backbone, save_model


@pytest.fixture(scope="module")
def digits_and_init(tmp_path_factory, ingest):
    root = tmp_path_factory.mktemp("cli")
    ingest("sklearn:digits", root / "d", "--limit", "100", "--seed", "0")
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    return root


def test_stage_options_come_from_unsupft_stage_option_variables(digits_and_init, tmp_path, cli_env):
    """`UNSUPFT_BN_ADAPT_BATCH_SIZE=16` is `--batch-size 16`, in a real `python -m unsupft` process;
    an option on the command line wins over its variable."""
    root = digits_and_init
    env = {**cli_env, "UNSUPFT_BN_ADAPT_BATCH_SIZE": "16", "UNSUPFT_BN_ADAPT_EPOCHS": "2",
           "UNSUPFT_BN_ADAPT_DATA": str(root / "d")}
    args = [sys.executable, "-m", "unsupft", "bn-adapt", "--init", str(root / "init")]
    first = subprocess.run([*args, "--out", str(tmp_path / "a")], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["batch_size"], config["epochs"], config["data"]) == (16, 2, str(root / "d"))
    second = subprocess.run([*args, "--epochs", "3", "--out", str(tmp_path / "b")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "b" / "config.json").read_text())["epochs"] == 3
    bad = subprocess.run([*args, "--out", str(tmp_path / "c")], env={**env, "UNSUPFT_BN_ADAPT_EPOCHS": "many"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "'many' is not a valid integer" in bad.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_command_shows_an_example(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    example = result.output.split("Example:\n", 1)[1].splitlines()[0].strip()
    assert example.startswith(f"unsupft {name} ")
    assert f"UNSUPFT_{name.upper().replace('-', '_')}_<OPTION>" in result.output
    # the example's options exist on the command
    command = main.get_command(click.Context(main), name)
    known = {opt for p in command.params for opt in p.opts}
    assert all(word in known for word in example.split() if word.startswith("--"))


def test_every_bn_adapt_option_says_what_it_does():
    command = main.get_command(click.Context(main), "bn-adapt")
    assert all(p.help for p in command.params if isinstance(p, click.Option)), \
        [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
