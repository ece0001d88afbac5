"""Option types with ranges that refuse NaN and infinities, and the static table of every stage's
options that lets `unsupft-ctl validate` check a pipeline's values without importing the stages.

Click's own `FloatRange` lets NaN through (every comparison with NaN is false) and accepts `inf`,
so `--lr nan` used to train until the loss was NaN. `Number` is the type of every numeric stage
option: finite, inside its range, and the message names the range.

The table (`stage_options.json` beside this file) is generated from the Click commands by
`python -m unsupft.options` (`make options-table`); tests/test_options.py checks that it matches
them. The controller rebuilds the very same Click types from it (`param_type`), so a value that
`validate` accepts is one the stage accepts, and the controller never imports torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

TABLE = Path(__file__).with_name("stage_options.json")


class Number(click.FloatRange):
    """A finite float inside [min, max] (bounds open when asked); NaN and infinities are refused."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def to_info_dict(self) -> dict[str, Any]:
        return {**super().to_info_dict(), "param_type": "Number"}


class Count(click.IntRange):
    """An integer inside [min, max]; booleans (YAML `true`) are refused rather than taken as 1."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            self.fail(f"{value!r} is not an integer", param, ctx)
        return super().convert(value, param, ctx)

    def to_info_dict(self) -> dict[str, Any]:
        return {**super().to_info_dict(), "param_type": "Count"}


class CountOrAuto(Count):
    """An integer inside [min, max], or "auto": the stage chooses the value from its data and says
    in config.json what it chose and why. "auto" itself is what the config hash sees."""

    name = "integer or auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "auto":
            return value
        return super().convert(value, param, ctx)

    def to_info_dict(self) -> dict[str, Any]:
        return {**super().to_info_dict(), "param_type": "CountOrAuto"}


def number(min: float | None = None, max: float | None = None, *, min_open: bool = False,
           max_open: bool = False) -> Number:
    return Number(min, max, min_open=min_open, max_open=max_open)


def count(min: int | None = None, max: int | None = None) -> Count:
    return Count(min, max)


# Shared bounds (what memory and time allow on any machine we run on, with room to spare).
SEED = count(0, 2**32 - 1)
LEARNING_RATE = number(0, 100, min_open=True)
BATCH = count(1, 65536)
EPOCHS = count(1, 100_000)
IMAGE_SIZE = count(1, 4096)  # side of a square model input, in pixels
STEPS = count(1, 100_000_000)


def param_type(info: dict[str, Any]) -> click.ParamType:
    """The Click type an entry of the table describes (the inverse of `to_info_dict`)."""
    kind = info["param_type"]
    if kind == "Number":
        return Number(info["min"], info["max"], min_open=info["min_open"], max_open=info["max_open"])
    if kind in ("Count", "CountOrAuto"):
        int_type = Count if kind == "Count" else CountOrAuto
        return int_type(info["min"], info["max"], min_open=info["min_open"], max_open=info["max_open"])
    if kind == "Choice":
        return click.Choice(info["choices"], case_sensitive=info["case_sensitive"])
    simple = {"Int": click.INT, "Float": click.FLOAT, "Bool": click.BOOL, "String": click.STRING}
    if kind not in simple:
        raise ValueError(f"option type {kind} is not in the table's vocabulary: add it to unsupft.options")
    return simple[kind]


def describe(command: click.Command) -> dict[str, dict[str, Any]]:
    """A command's options by parameter name (`--replay-source` -> replay_source), as JSON."""
    table: dict[str, dict[str, Any]] = {}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        info = param.to_info_dict()
        entry = {"type": info["type"], "multiple": info["multiple"], "is_flag": info["is_flag"],
                 "secondary_opts": info["secondary_opts"]}
        for opt in param.opts:
            if opt.startswith("--"):
                table[opt[2:].replace("-", "_")] = entry
    return table


def generate() -> dict[str, dict[str, dict[str, Any]]]:
    """The table of every stage command (imports the stages: torch and all)."""
    import importlib

    from unsupft.registry import STAGES

    table = {}
    for kind, spec in sorted(STAGES.items()):
        module_name, attr = spec.command.split(":")
        table[kind] = describe(getattr(importlib.import_module(module_name), attr))
    return json.loads(json.dumps(table))  # tuples -> lists, as read back from the file


def load() -> dict[str, dict[str, dict[str, Any]]]:
    return json.loads(TABLE.read_text())


def render(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The table as JSON with one option per line (small diffs when an option changes)."""
    kinds = []
    for kind, opts in sorted(table.items()):
        lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}" for name, entry in sorted(opts.items()))
        kinds.append(f"{json.dumps(kind)}: {{\n{lines}\n }}")
    return "{\n " + ",\n ".join(kinds) + "\n}\n"


if __name__ == "__main__":
    TABLE.write_text(render(generate()))
    print(f"wrote {TABLE}")
