"""`unsupft`: one sub-command per stage, as `unsupft.registry` declares them.

Stage modules import torch and friends, so sub-commands are loaded lazily: `unsupft --help` and a
typo in a command name answer at once. Each option also reads `UNSUPFT_<STAGE>_<OPTION>` from the
environment (how pod specs and CI usually set them); an option given on the command line wins.
The names are set per option rather than by Click's `auto_envvar_prefix`, which derives them from
Python parameter names. A data-set input may be `chosen:<select-source output>` (the source that
stage chose, `unsupft.stage.resolve_chosen`): resolved here, before the stage sees its options.
`unsupft launch` runs a stage on several processes (`unsupft.distributed.launch`).
An empty output (`--out ''`, a variable expanding to nothing) is refused here: as a path it would
be the current directory.
"""

from __future__ import annotations

import functools
import pkgutil
from typing import Any

import click

from unsupft import __version__
from unsupft.errors import OneLineGroup, report_user_errors
from unsupft.registry import STAGES, StageSpec
from unsupft.stage import resolve_chosen


def _add_environment(spec: StageSpec, command: click.Command) -> None:
    """Give each option of a stage its `UNSUPFT_<STAGE>_<OPTION>` variable, and the help its example."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None:
            param.envvar = spec.env_name(max(param.opts, key=len))
    if not command.epilog:
        command.epilog = (f"\b\nExample:\n  {spec.example}\n\n"
                          f"Every option can also be set as {spec.env_name('')}<OPTION>.")


# The parameters naming where a stage writes (`--out`; ingest's positional OUT_URI).
_OUTPUTS = ("out", "out_uri")


def _not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An output that is empty or blank: refused (`store.normalize` would make it the current directory)."""
    if isinstance(value, str) and not value.strip():
        raise click.BadParameter("empty; give the output's path or URI ('.' for the current directory)",
                                 ctx=ctx, param=param)
    return value


def _refuse_empty_outputs(command: click.Command) -> None:
    """Give the stage's output parameter a check that it is not empty (`_not_empty`)."""
    for param in command.params:
        if param.name in _OUTPUTS and param.callback is None:
            param.callback = _not_empty


def _resolve_chosen_sources(spec: StageSpec, command: click.Command) -> None:
    """Turn `chosen:<URI>` values of the stage's data-set inputs into the chosen data set's URI
    before its callback runs, so its config, config hash and `_DONE.json` inputs name that data set."""
    names = [param.name for param in command.params if isinstance(param, click.Option)
             and max(param.opts, key=len).lstrip("-").replace("-", "_") in spec.datasets]
    if not names:
        return
    stage_callback = command.callback

    @report_user_errors
    @functools.wraps(stage_callback)
    def callback(*args: Any, **kwargs: Any) -> Any:
        for name in names:
            value = kwargs[name]
            if isinstance(value, tuple):
                kwargs[name] = tuple(resolve_chosen(v) for v in value)
            elif isinstance(value, str):
                kwargs[name] = resolve_chosen(value)
        return stage_callback(*args, **kwargs)

    command.callback = callback


@functools.cache
def _load(spec: StageSpec) -> click.Command:
    """The stage's command, imported and prepared once per process."""
    command = pkgutil.resolve_name(spec.command)
    _add_environment(spec, command)
    _refuse_empty_outputs(command)
    _resolve_chosen_sources(spec, command)
    return command


class LazyGroup(OneLineGroup):
    """A click group whose sub-commands, the stages of `unsupft.registry`, are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*STAGES, *self.commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _load(STAGES[name]) if name in STAGES else super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unsupft")
def main() -> None:
    """unsupft stages: each reads inputs from URIs and writes its outputs to --out."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
              add_help_option=False,  # `unsupft launch --help` is torchrun's help
              short_help="Run a stage on several processes (torchrun).")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@report_user_errors
def launch(argv: tuple[str, ...]) -> None:
    """Run a stage on several processes (torchrun's options, then STAGE ...); exits with the stage's code."""
    from unsupft.distributed import launch as launch_stage  # torch: only when launching

    launch_stage(argv)
