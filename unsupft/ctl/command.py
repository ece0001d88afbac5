"""A stage's parameters -> its command line, one generic rule for every kind.

`replay_fraction: 0.1` -> `--replay-fraction 0.1`; `true` -> `--flag`, `false` -> `--no-flag`;
a list -> the option repeated (or one comma-joined value where the option takes a single value);
a mapping -> `--option KEY=VALUE` per entry (evaluate's `--model NAME=URI`). When the stage command
is installed, its Click options are read so that parameter names and flags are checked before a run
starts instead of failing minutes later inside a container.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from typing import Any

import click

from unsupft.ctl.spec import Pipeline, Stage
from unsupft.errors import UserError


def _options(kind: str) -> dict[str, click.Option] | None:
    """The stage command's options by parameter name, or None when they are not ours to know:
    this install lacks the stage, or `UNSUPFT_STAGE_PROGRAM` runs stages through another program."""
    from unsupft.cli import STAGES

    if kind not in STAGES or os.environ.get("UNSUPFT_STAGE_PROGRAM"):
        return None
    module_name, attr = STAGES[kind].split(":")
    try:
        command = getattr(importlib.import_module(module_name), attr)
    except ImportError:
        return None
    # Keyed by the long option as typed (`--replay-source` -> replay_source), not the Python name.
    return {opt[2:].replace("-", "_"): p for p in command.params if isinstance(p, click.Option)
            for opt in p.opts if opt.startswith("--")}


def check_options(pipeline: Pipeline, file: str) -> None:
    """Every parameter must be an option of its stage command (when the command is installed)."""
    for stage in pipeline.stages.values():
        options = _options(stage.kind)
        if options is None:
            continue
        for key, value in stage.params.items():
            if key not in options:
                known = ", ".join(sorted(k for k in options if k != "out"))
                raise UserError(f"{file}: stages.{stage.name}.{key}: '{stage.kind}' has no option --{key.replace('_', '-')} (options: {known})")
            option = options[key]
            if option.is_flag and not isinstance(value, bool):
                raise UserError(f"{file}: stages.{stage.name}.{key}: expected true or false, got {value!r}")
            if isinstance(option.type, click.Choice):
                for v in value if isinstance(value, list) else [value]:
                    if str(v) not in option.type.choices:
                        raise UserError(f"{file}: stages.{stage.name}.{key}: {v!r} is not one of {', '.join(option.type.choices)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def stage_args(stage: Stage, run_uri: str) -> list[str]:
    """`[kind, --option value ..., --out URI]`; `stage:<name>` inputs become that stage's output URI."""
    from unsupft import store

    options = _options(stage.kind) or {}

    def resolve(v: Any) -> str:
        if isinstance(v, str) and v.startswith("stage:"):
            return store.join(run_uri, v[len("stage:"):])
        return str(v).lower() if isinstance(v, bool) else str(v)

    args = [stage.kind]
    for key, value in stage.params.items():
        flag, option = _flag(key), options.get(key)
        if isinstance(value, bool):
            if value:
                args.append(flag)
            elif option is None or option.secondary_opts:
                args.append(option.secondary_opts[0] if option else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, dict):
            for k, v in value.items():
                args += [flag, f"{k}={resolve(v)}"]
        elif isinstance(value, list):
            if option is not None and not option.multiple:
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
