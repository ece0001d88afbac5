"""The opt-in to load pickled checkpoints with the full unpickler (see `unsupft.checkpoint`).

Kept apart from `unsupft.checkpoint` (which needs torch) so that `unsupft-ctl` can keep the
variable out of the stages it starts without importing torch.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import click

TRUST_ENV = "UNSUPFT_TRUST_CHECKPOINTS"

# Set by `--trust-checkpoint` for the duration of one command (None: the environment decides).
_trust_override: bool | None = None

F = TypeVar("F", bound=Callable[..., Any])


def trusted() -> bool:
    """Whether pickled checkpoints may be loaded with the full (code-running) unpickler."""
    if _trust_override is not None:
        return _trust_override
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _set_trust(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    global _trust_override
    if not value:
        return
    _trust_override = True

    def reset() -> None:
        global _trust_override
        _trust_override = None

    ctx.call_on_close(reset)  # in-process callers (tests, notebooks) do not inherit the trust


def trust_option(fn: F) -> F:
    """The `--trust-checkpoint` flag of every command that loads a checkpoint."""
    return click.option(
        "--trust-checkpoint", is_flag=True, expose_value=False, envvar=TRUST_ENV, callback=_set_trust,
        help=f"Load pickled checkpoints that hold more than tensors (config objects) with the full "
             f"unpickler, which can run code from the file: only for files you trust. Also {TRUST_ENV}=1.",
    )(fn)
