"""`unsupft`: one sub-command per stage.

Stage modules import torch and friends, so sub-commands are loaded lazily: `unsupft --help` and a
typo in a command name answer at once. To add a stage, add one line to `STAGES`.

Every option can also come from the environment as `UNSUPFT_<STAGE>_<OPTION>` (Click's automatic
environment variables: `UNSUPFT_TRANSFER_EPOCHS=5`, `UNSUPFT_BN_ADAPT_BATCH_SIZE=128`), which is
how pod specs and CI usually set them; a flag given on the command line wins.
"""

from __future__ import annotations

import importlib

import click

from unsupft import __version__

ENV_PREFIX = "UNSUPFT"

# command name -> "module:attribute" of its click.Command
STAGES: dict[str, str] = {
    "ingest": "unsupft.data.ingest:ingest_command",
    "pretrain": "unsupft.train.pretrain:pretrain_command",
    "bn-adapt": "unsupft.train.pretrain:bn_adapt_command",
    "adapt": "unsupft.train.adapt:adapt_command",
    "transfer": "unsupft.train.transfer_stage:transfer_command",
    "evaluate": "unsupft.eval.evaluate:evaluate_command",
    "annotate": "unsupft.select.annotate_web:annotate_command",
    "label": "unsupft.select.progressive:label_command",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when used."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)


def option_env_prefixes() -> tuple[str, ...]:
    """The environment-variable prefix of each stage's options (`UNSUPFT_BN_ADAPT_`, ...)."""
    return tuple(f"{ENV_PREFIX}_{name.upper().replace('-', '_')}_" for name in STAGES)


@click.group(cls=LazyGroup, lazy=STAGES,
             context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": ENV_PREFIX})
@click.version_option(__version__, prog_name="unsupft")
def main() -> None:
    """unsupft stages: each reads inputs from URIs and writes its outputs to --out."""
