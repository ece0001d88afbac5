"""A benchmark's section of BENCHMARKS.md: printed, and written in place of the old one."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], path: Path | None, heading: str) -> None:
    """Print the section; with `path`, also write it there (see `write_section`)."""
    section = "\n".join(lines)
    print(section)
    if path is not None:
        write_section(path, heading, section)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section starting with `heading` (up to the next `## `) by `section`, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
