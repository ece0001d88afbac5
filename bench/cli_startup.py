"""Wall time of `unsupft --help` and `unsupft <stage> --help`, this tree against an older commit.

The older commit is checked out in a temporary git worktree; both sides run with the same Python
(this venv), alternating, each command `--repeats` times; the median is reported.

    PYTHONPATH=. python bench/cli_startup.py [--old 52621bf] [--repeats 7]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["pretrain", "--help"], ["evaluate", "--help"])


def _seconds(tree: Path, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unsupft", *args], cwd=tree, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(tree)})
    return time.perf_counter() - start


@click.command()
@click.option("--old", default="52621bf", show_default=True, help="The commit to compare against.")
@click.option("--repeats", default=7, show_default=True)
def main(old: str, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), old],
                       check=True, capture_output=True)
        try:
            for args in COMMANDS:
                times: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(repeats):
                    times["old"].append(_seconds(old_tree, args))
                    times["new"].append(_seconds(ROOT, args))
                old_s, new_s = (statistics.median(times[k]) for k in ("old", "new"))
                print(f"unsupft {' '.join(args):<18} {old}: {old_s:.3f} s   this tree: {new_s:.3f} s   "
                      f"{old_s / new_s:.0f}x faster")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], check=True)


if __name__ == "__main__":
    main()
