"""`unsupft`: one sub-command per stage.

Stage modules import torch and friends, so sub-commands are loaded lazily: `unsupft --help` and a
typo in a command name answer at once. To add a stage, add one line to `STAGES`.

Every option can also come from the environment as `UNSUPFT_<STAGE>_<OPTION>`, named after the
flag (`UNSUPFT_TRANSFER_EPOCHS=5`, `UNSUPFT_BN_ADAPT_DATA=...`), which is how pod specs and CI
usually set them; an option given on the command line wins. The names are set per option rather
than by Click's `auto_envvar_prefix`, which derives them from Python parameter names (`--data`
is `data_uri` in some stages, so the variable would be `..._DATA_URI`).
"""

from __future__ import annotations

import importlib

import click

from unsupft import __version__
from unsupft.errors import OneLineGroup

ENV_PREFIX = "UNSUPFT"

# command name -> "module:attribute" of its click.Command
STAGES: dict[str, str] = {
    "ingest": "unsupft.data.ingest:ingest_command",
    "pretrain": "unsupft.train.pretrain:pretrain_command",
    "bn-adapt": "unsupft.train.pretrain:bn_adapt_command",
    "adapt": "unsupft.train.adapt:adapt_command",
    "transfer": "unsupft.train.transfer_stage:transfer_command",
    "semi": "unsupft.train.semi:semi_command",
    "select-source": "unsupft.train.select_source:select_source_command",
    "evaluate": "unsupft.eval.evaluate:evaluate_command",
    "annotate": "unsupft.select.annotate_web:annotate_command",
    "label": "unsupft.select.progressive:label_command",
}


# One example per command, shown under its --help (kept here, beside the list of commands).
EXAMPLES: dict[str, str] = {
    "ingest": "unsupft ingest sklearn:digits data/digits --split 0.3 --seed 0",
    "pretrain": "unsupft pretrain --data data/src/train --arch tiny --steps 100 --batch-size 64 --out runs/base",
    "bn-adapt": "unsupft bn-adapt --init runs/base --data data/tgt/train --out runs/bn",
    "adapt": "unsupft adapt --init runs/base --target data/tgt/train --replay-source data/src/train "
             "--mix cutmix --steps 60 --batch-size 64 --out runs/adapt",
    "transfer": "unsupft transfer --init runs/adapt --train data/tgt/train --shots 4 --method coin --out runs/coin",
    "semi": "unsupft semi --init runs/adapt --train data/tgt/train --shots 4 --unlabeled data/tgt/train "
            "--test data/tgt/test --steps 500 --out runs/semi",
    "select-source": "unsupft select-source --init runs/base --candidate a=data/src-a/train --candidate b=data/src-b/train "
                     "--probe-train data/tgt/train --probe-test data/tgt/test --steps 200 --out runs/select",
    "evaluate": "unsupft evaluate --model base=runs/base --model adapt=runs/adapt --train data/tgt/train "
                "--test data/tgt/test --shots 1,4 --out runs/eval",
    "annotate": "unsupft annotate runs/label",
    "label": "unsupft label --init runs/adapt --data data/tgt/train --test data/tgt/test --budget 2 "
             "--annotator manual --out runs/label",
}


def _env_name(command_name: str, flag: str) -> str:
    return f"{ENV_PREFIX}_{command_name}_{flag.lstrip('-')}".upper().replace("-", "_")


def _add_environment(name: str, command: click.Command) -> None:
    """Give each option of a stage its `UNSUPFT_<STAGE>_<OPTION>` variable, and the help its example."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar is None:
            param.envvar = _env_name(name, max(param.opts, key=len))
    if name in EXAMPLES and not command.epilog:
        command.epilog = (f"\b\nExample:\n  {EXAMPLES[name]}\n\n"
                          f"Every option can also be set as {_env_name(name, '')}<OPTION>.")


class LazyGroup(OneLineGroup):
    """A click group whose sub-commands are imported only when used."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            _add_environment(name, command)
            return command
        return super().get_command(ctx, name)


def option_env_prefixes() -> tuple[str, ...]:
    """The environment-variable prefix of each stage's options (`UNSUPFT_BN_ADAPT_`, ...)."""
    return tuple(_env_name(name, "") for name in STAGES)


@click.group(cls=LazyGroup, lazy=STAGES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unsupft")
def main() -> None:
    """unsupft stages: each reads inputs from URIs and writes its outputs to --out."""
