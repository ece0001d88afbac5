"""The one way a stage reports a problem the user can fix.

A `UserError` carries a single line naming what is wrong (a URI, a field, a file). The CLIs turn it
into that line on stderr and exit code 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

EXIT_USER_ERROR = 2
# The label stage exits with this when it waits for a person to label a batch (the controller
# recognises it and marks the stage waiting-for-labels instead of failed).
EXIT_WAITING_FOR_LABELS = 75

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A problem with the input (bad URI, missing file, malformed config): one line, exit 2."""

    def __init__(self, message: str) -> None:
        message = str(message)
        if message.startswith("Caught ") and "Original Traceback" in message:
            # Re-raised by a DataLoader from a worker process with the worker's traceback appended
            # (torch.utils.data re-creates the exception from that text): keep the original line.
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(" ".join(message.split()))


def report_user_errors(fn: F) -> F:
    """Decorate a Click command so that a `UserError` becomes one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
