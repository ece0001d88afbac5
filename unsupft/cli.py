"""`unsupft`: one sub-command per stage, as `unsupft.registry` declares them.

Stage modules import torch and friends, so sub-commands are loaded lazily: `unsupft --help` and a
typo in a command name answer at once. Each option also reads `UNSUPFT_<STAGE>_<OPTION>` from the
environment (how pod specs and CI usually set them); an option given on the command line wins.
The names are set per option rather than by Click's `auto_envvar_prefix`, which derives them from
Python parameter names.
"""

from __future__ import annotations

import importlib

import click

from unsupft import __version__
from unsupft.errors import OneLineGroup
from unsupft.registry import STAGES, StageSpec


def _add_environment(spec: StageSpec, command: click.Command) -> None:
    """Give each option of a stage its `UNSUPFT_<STAGE>_<OPTION>` variable, and the help its example."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None:
            param.envvar = spec.env_name(max(param.opts, key=len))
    if not command.epilog:
        command.epilog = (f"\b\nExample:\n  {spec.example}\n\n"
                          f"Every option can also be set as {spec.env_name('')}<OPTION>.")


class LazyGroup(OneLineGroup):
    """A click group whose sub-commands are imported only when used."""

    def __init__(self, *args, lazy: dict[str, StageSpec], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name].command.split(":")
            command = getattr(importlib.import_module(module_name), attr)
            _add_environment(self.lazy[name], command)
            return command
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy=STAGES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unsupft")
def main() -> None:
    """unsupft stages: each reads inputs from URIs and writes its outputs to --out."""
