"""A stage's parameters -> its command line, one generic rule for every kind.

`replay_fraction: 0.1` -> `--replay-fraction 0.1`; `true` -> `--flag`, `false` -> `--no-flag`;
a list -> the option repeated (or one comma-joined value where the option takes a single value);
a mapping -> `--option KEY=VALUE` per entry (evaluate's `--model NAME=URI`). Parameter names, flags
and every value are checked before a run starts, against the static table of the stage commands'
options (`unsupft.options`): with the same Click types the stage itself converts them with, so a
value `validate` accepts is one the stage accepts, and the controller does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import click

from unsupft import options as option_table
from unsupft import store
from unsupft.ctl.spec import Pipeline, Stage
from unsupft.errors import UserError
from unsupft.stage import CHOSEN_PREFIX


def _options(kind: str) -> dict[str, dict[str, Any]] | None:
    """The stage command's options by parameter name (table entries), or None when they are not
    ours to know: `UNSUPFT_STAGE_PROGRAM` runs stages through another program."""
    if os.environ.get("UNSUPFT_STAGE_PROGRAM"):
        return None
    return option_table.load().get(kind)


def _check_value(where: str, option: dict[str, Any], value: Any) -> None:
    if option["is_flag"]:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return
    param_type = option_table.param_type(option["type"])
    if isinstance(value, dict):
        values = [f"{k}={v}" for k, v in value.items()]
    else:
        values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(values) > 1 and not option["multiple"] and not isinstance(param_type, click.types.StringParamType):
        raise UserError(f"{where}: takes one value, got a list of {len(values)}")
    for v in values:
        if isinstance(v, bool) and not isinstance(param_type, click.types.BoolParamType):
            hint = " (quote it: YAML reads yes, no, on, off as booleans)" if isinstance(param_type, (click.Choice, click.types.StringParamType)) else ""
            raise UserError(f"{where}: expected {param_type.name}, got {v!r}{hint}")
        try:
            param_type.convert(v if isinstance(param_type, (option_table.Number, option_table.Count)) else str(v), None, None)
        except click.BadParameter as exc:
            raise UserError(f"{where}: {exc.message}") from None


def check_options(pipeline: Pipeline, file: str) -> None:
    """Every parameter must be an option of its stage command, with a value the stage accepts."""
    for stage in pipeline.stages.values():
        options = _options(stage.kind)
        if options is None:
            continue
        for key, value in stage.params.items():
            line = stage.lines.get(key)
            where = f"{file}{f':{line}' if line else ''}: stages.{stage.name}.{key}"
            if key not in options:
                known = ", ".join(sorted(k for k in options if k not in ("out", "overwrite")))
                raise UserError(f"{where}: '{stage.kind}' has no option --{key.replace('_', '-')} (options: {known})")
            if key == "overwrite":
                raise UserError(f"{where}: the controller owns each stage's output; remove 'overwrite'")
            _check_value(where, options[key], value)


def stage_args(stage: Stage, run_uri: str) -> list[str]:
    """`[kind, --option value ..., --out URI]`; `stage:<name>` inputs become that stage's output URI,
    `chosen:stage:<name>` ones `chosen:<that URI>` (the stage resolves it: `unsupft.stage.resolve_chosen`)."""
    options = _options(stage.kind) or {}

    def resolve(v: Any) -> str:
        if isinstance(v, str) and v.startswith(CHOSEN_PREFIX):  # the stage reads the choice itself
            return CHOSEN_PREFIX + resolve(v[len(CHOSEN_PREFIX):])
        if isinstance(v, str) and v.startswith("stage:"):
            return store.join(run_uri, v[len("stage:"):])
        return str(v).lower() if isinstance(v, bool) else str(v)

    args = [stage.kind]
    for key, value in stage.params.items():
        flag, option = "--" + key.replace("_", "-"), options.get(key)
        if isinstance(value, bool):
            if value:
                args.append(flag)
            elif option is None or option["secondary_opts"]:
                args.append(option["secondary_opts"][0] if option else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            for k, v in value.items():
                args += [flag, f"{k}={resolve(v)}"]
        elif isinstance(value, list):
            if option is not None and not option["multiple"]:
                args += [flag, ",".join(resolve(v) for v in value)]
            else:
                for v in value:
                    args += [flag, resolve(v)]
        else:
            args += [flag, resolve(value)]
    return args + ["--out", store.join(run_uri, stage.name)]


def stage_keys(pipeline: Pipeline, run_uri: str) -> dict[str, str]:
    """A cache key per stage: its command line plus the keys of the stages it reads from.

    A changed parameter upstream changes every key downstream, so those stages re-run too.
    """
    keys: dict[str, str] = {}
    for name, stage in pipeline.stages.items():  # DAG order: needs come first
        blob = json.dumps({"args": stage_args(stage, run_uri), "needs": [keys[n] for n in stage.needs]})
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys
