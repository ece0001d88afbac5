"""The opt-in to load pickled checkpoints with the full unpickler (see `unsupft.checkpoint`).

Kept apart from `unsupft.checkpoint` (which needs torch) so that `unsupft-ctl` can keep the
variable out of the stages it starts without importing torch.
"""

from __future__ import annotations

import os

import click

TRUST_ENV = "UNSUPFT_TRUST_CHECKPOINTS"

# Set by `--trust-checkpoint` for the duration of one command (None: the environment decides).
_trust_override: bool | None = None


def trusted() -> bool:
    """Whether pickled checkpoints may be loaded with the full (code-running) unpickler."""
    if _trust_override is not None:
        return _trust_override
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def set_trust(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """The callback of `--trust-checkpoint` (`unsupft.stage.StageOptions`): trust for this command."""
    global _trust_override
    if value:
        _trust_override = True

        def reset() -> None:
            global _trust_override
            _trust_override = None

        ctx.call_on_close(reset)  # in-process callers (tests, notebooks) do not inherit the trust
    return value
