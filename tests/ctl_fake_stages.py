"""Stand-in stage commands for controller tests until the real stages land on this branch.

`python -m tests.ctl_fake_stages <kind> ... --out URI` behaves like a stage as far as the
controller can see: it sleeps a little, counts its runs in `<out>/runs.txt`, and writes
`_DONE.json` last through the real stage contract (`unsupft.stage.write_done`). `--fail-once`
fails the first attempt; `--sleep` sets the duration (and spawns a child, to check that cancel
kills the whole process group).
"""

from __future__ import annotations

import subprocess
import sys
import time

import click

from unsupft import stage, store


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("kind")
@click.option("--out", required=True)
@click.option("--sleep", type=float, default=0.2)
@click.option("--fail-once", is_flag=True)
@click.pass_context
def main(ctx: click.Context, kind: str, out: str, sleep: float, fail_once: bool) -> None:
    started = time.time()
    runs_uri = store.join(out, "runs.txt")
    runs = store.read_text(runs_uri) if store.exists(runs_uri) else ""
    store.write_text(runs_uri, runs + f"{kind} {' '.join(ctx.args)}\n")
    if fail_once and not runs:
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({sleep})"])
    child.wait()
    config = {"kind": kind, "args": ctx.args}
    stage.write_done(out, kind, config, {}, ["runs.txt"], started)


if __name__ == "__main__":
    main()
