"""The ways a stage reports a problem that is not a bug, each with its own exit code.

A `UserError` carries a single line naming what is wrong (a URI, a field, a file): exit code 2, and
retrying will not help. An `InfraError` is a failure of the infrastructure that outlasted the
retries (the store unreachable or failing, another writer holding the output): exit code 69
(EX_UNAVAILABLE), and the same command may well succeed later, so a scheduler can retry it. The CLIs
turn either into one `error: ...` line on stderr; every other exception is a bug and keeps its
traceback.

A file-system failure is classified by its cause (`os_error`), wherever it happens: a full disk or
an exceeded quota is infrastructure (exit 69: free space and run the command again; it resumes, as
every store write is a temp file renamed whole), a place that cannot be written (read-only file
system, permission denied) is bad input (exit 2: the command names the wrong place).
"""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any, Callable, TypeVar

import click

EXIT_USER_ERROR = 2
# Infrastructure failure after retries (sysexits.h EX_UNAVAILABLE): retrying later may succeed.
EXIT_INFRA = 69
# The label stage exits with this when it waits for a person to label a batch (the controller
# recognises it and marks the stage waiting-for-labels instead of failed).
EXIT_WAITING_FOR_LABELS = 75

F = TypeVar("F", bound=Callable[..., Any])


class ReportedError(Exception):
    """An error reported as one `error: ...` line with the exit code of its class."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        message = str(message)
        if message.startswith("Caught ") and "Original Traceback" in message:
            # Re-raised by a DataLoader from a worker process with the worker's traceback appended
            # (torch.utils.data re-creates the exception from that text): keep the original line.
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(" ".join(message.split()))


class UserError(ReportedError):
    """A problem with the input (bad URI, missing file, malformed config): one line, exit 2."""

    exit_code = EXIT_USER_ERROR


class InfraError(ReportedError):
    """The store (or another shared resource) failed past the retry budget: one line, exit 69."""

    exit_code = EXIT_INFRA


_NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def os_error(exc: OSError, path: object = None) -> ReportedError | None:
    """The one-line error of a file-system failure that is not a bug, naming `path` (default: the
    file the exception names), or None for any other `OSError`."""
    where = path if path is not None else exc.filename
    prefix = f"{where}: " if where is not None else ""
    if exc.errno in _NO_SPACE:
        return InfraError(f"{prefix}{_NO_SPACE[exc.errno]}; free some space and run the same command again "
                          f"(nothing was half-written)")
    if exc.errno in _NOT_WRITABLE:
        return UserError(f"{prefix}{_NOT_WRITABLE[exc.errno]}")
    return None


def report_user_errors(fn: F) -> F:
    """Decorate a Click command so that a `ReportedError`, or an `OSError` that `os_error` knows,
    becomes one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ReportedError, OSError) as exc:
            error = os_error(exc) if isinstance(exc, OSError) else exc
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)

    return wrapper  # type: ignore[return-value]


class _UsageLine(click.ClickException):
    """A Click usage error (bad option value, unknown option) shown as one `error:` line, exit 2."""

    exit_code = EXIT_USER_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {' '.join(self.format_message().split())}", err=True)


class OneLineGroup(click.Group):
    """A Click group whose usage errors print one line (`error: Invalid value for '--lr': ...`)
    instead of Click's usage, hint and message: the same shape as every other bad input."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message()) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message()) from None
