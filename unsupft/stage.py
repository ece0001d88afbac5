"""The stage contract shared by every `unsupft <stage>` command (see DESIGN.md, "A stage is a command").

A stage writes into its output URI: `config.json` (its resolved config) first, its artifacts, and
last `_DONE.json` (config hash, inputs, outputs, versions, timings). A stage whose `_DONE.json`
exists with the same config hash is complete; the controller skips it on a re-run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from typing import Any, Iterable

from unsupft import __version__, store

DONE = "_DONE.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a stage's resolved config (keys sorted, JSON-encoded)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import torch

    return {"unsupft": __version__, "torch": torch.__version__, "python": platform.python_version()}


def write_config(out: str, config: dict[str, Any]) -> None:
    store.write_json(store.join(out, CONFIG), config)


def read_done(out: str) -> dict[str, Any] | None:
    """The stage's `_DONE.json`, or None when it has not finished."""
    uri = store.join(out, DONE)
    return store.read_json(uri) if store.exists(uri) else None


def is_done(out: str, config: dict[str, Any]) -> bool:
    done = read_done(out)
    return done is not None and done.get("config_hash") == config_hash(config)


def write_done(
    out: str,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    outputs: Iterable[str],
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """Write `_DONE.json` last: from here on the stage counts as complete."""
    manifest = {
        "stage": stage,
        "config_hash": config_hash(config),
        "inputs": inputs,
        "outputs": sorted(outputs),
        "versions": versions(),
        "started": started,
        "finished": time.time(),
        "seconds": round(time.time() - started, 3),
        **extra,
    }
    store.write_json(store.join(out, DONE), manifest)
    return manifest
