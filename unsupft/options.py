"""Option types with ranges that refuse NaN and infinities, and the static table of every stage's
options that lets `unsupft-ctl validate` check a pipeline's values without importing the stages.

Click's own `FloatRange` lets NaN through (every comparison with NaN is false) and accepts `inf`,
so `--lr nan` used to train until the loss was NaN. `Number` is the type of every numeric stage
option: finite, inside its range, and the message names the range.

A stage's options are one frozen dataclass (`Options`) whose fields are declared with `option`:
the field's default, type and help are the Click option's, `options_from` turns the fields into the
command's parameters and hands the body one config object, and `Options.identity` (what the stage
hashes) follows each field's `hashed`. Declaring an option is one field; a group of options that
several stages share is a base class.

The table (`stage_options.json` beside this file) is generated from the Click commands by
`python -m unsupft.options` (`make options-table`); tests/test_options.py checks that it matches
them. The controller rebuilds the very same Click types from it (`param_type`), so a value that
`validate` accepts is one the stage accepts, and the controller never imports torch.
"""

from __future__ import annotations

import functools
import json
import math
import pkgutil
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

import click

from unsupft.errors import UserError

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


class Count(click.IntRange):
    """An integer inside [min, max]; booleans (YAML `true`) are refused rather than taken as 1."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            self.fail(f"{value!r} is not an integer", param, ctx)
        return super().convert(value, param, ctx)


class CountOrAuto(Count):
    """An integer inside [min, max], or "auto": the stage chooses the value from its data and says
    in config.json what it chose and why. "auto" itself is what the config hash sees."""

    name = "integer or auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "auto":
            return value
        return super().convert(value, param, ctx)


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


OPTION = "unsupft.option"  # the key of a field's option description in its metadata


def option(default: Any = MISSING, *, help: str | None = None, flag: str | None = None, argument: bool = False,
           hashed: bool | Literal["given"] = True, **click_kwargs: Any) -> Any:
    """A config field that is also a command-line parameter.

    `default` is the field's and the option's (none: a required option); the flag is `--field-name`
    unless `flag` names another (`--split` for `test_fraction`); `argument` makes it a positional
    argument. `hashed` says whether the value is part of the stage's config hash: not where the
    output goes nor how fast it is computed (False), or only when given ("given": outputs of runs
    from before the option existed keep their hash). Everything else (`type`, `multiple`,
    `is_flag`, `metavar`, ...) goes to Click as it is.
    """
    spec = {"help": help, "flag": flag, "argument": argument, "hashed": hashed, "click": click_kwargs}
    return field(default=default, metadata={OPTION: spec})


@dataclass(frozen=True, kw_only=True)
class Options:
    """The base of every stage's config: the options as given on the command line."""

    def identity(self) -> dict[str, Any]:
        """The options that decide what the stage computes (its config hash), by each field's
        `hashed`; repeated options as lists, as they read back from config.json."""
        identity = {}
        for f in fields(self):
            hashed, value = f.metadata[OPTION]["hashed"], getattr(self, f.name)
            if hashed is True or hashed == "given" and value:
                identity[f.name] = list(value) if isinstance(value, tuple) else value
        return identity


def option_fields(config_class: type[Options]) -> list[Field]:
    """The option fields in the order `--help` lists them: the class's own first, then those of the
    groups it extends, so that shared options (`--out`, ...) close the list. A field that a class
    declares again (to give it its own help) keeps the place where it was first declared."""
    merged = {f.name: f for f in fields(config_class) if OPTION in f.metadata}
    names: list[str] = []
    for klass in reversed(config_class.__mro__):  # the bases first; each class puts its new options in front
        names = [n for n in vars(klass).get("__annotations__", {}) if n in merged and n not in names] + names
    return [merged[n] for n in names]


def _parameter(f: Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    spec = f.metadata[OPTION]
    kwargs = dict(spec["click"])
    if spec["argument"]:
        return click.argument(f.name, **kwargs)
    if f.default is MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default
        kwargs.setdefault("show_default", f.default not in (None, ()) and not kwargs.get("is_flag"))
    return click.option(spec["flag"] or "--" + f.name.replace("_", "-"), f.name, help=spec["help"], **kwargs)


def options_from(config_class: type[Options]) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """Decorate a command body that takes one config: add a Click parameter per option field of
    `config_class` and call the body with `config_class(**values)`."""
    def decorate(body: Callable[[Any], Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def command(**values: Any) -> Any:
            return body(config_class(**values))

        for f in reversed(option_fields(config_class)):
            command = _parameter(f)(command)
        return command

    return decorate


def parse_named(specs: tuple[str, ...], option: str) -> dict[str, str]:
    """`NAME=URI` values of a repeatable option (`--model`, `--candidate`), by name."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, uri = spec.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"{option} '{spec}': expected NAME=URI")
        if name in named:
            raise UserError(f"{option}: the name '{name}' is given twice")
        named[name] = uri
    return named


def param_type(info: dict[str, Any]) -> click.ParamType:
    """The Click type an entry of the table describes (the inverse of `to_info_dict`, whose
    `param_type` is the type's class name)."""
    kind = info["param_type"]
    ranged = {"Number": Number, "Count": Count, "CountOrAuto": CountOrAuto}
    if kind in ranged:
        return ranged[kind](info["min"], info["max"], min_open=info["min_open"], max_open=info["max_open"])
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
    from unsupft.registry import STAGES

    table = {kind: describe(pkgutil.resolve_name(spec.command)) for kind, spec in sorted(STAGES.items())}
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
