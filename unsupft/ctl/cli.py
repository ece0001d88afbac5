"""`unsupft-ctl`: validate, run, submit and inspect pipelines."""

from __future__ import annotations

import click

from unsupft import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="unsupft-ctl")
def main() -> None:
    """Run unsupft pipelines locally or on Kubernetes."""
