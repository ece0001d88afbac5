"""What the report says about where each model came from, read from the stage manifests.

A model in a report is more than a path: `model_card` follows the `init` input of each stage's
`_DONE.json` back to the first stage (or to the checkpoint file someone brought in), and records
per stage what it was (stage, method), how long it trained (steps or epochs), on how much data (the
sample count of each input data set, the labels it was finetuned on) and with which unsupft.
`label_rounds` reads a label stage's accuracy per round (`rounds.jsonl`) for the report's curve.
Nothing here loads a checkpoint or an image: only manifests and `dataset.json` files.
"""

from __future__ import annotations

import json
from typing import Any

from unsupft import stage, store
from unsupft.data.info import read_info
from unsupft.errors import UserError
from unsupft.models.io import describe

# A chain longer than this is cut (a pipeline's stages form a DAG; a loop would be a corrupt store).
MAX_CHAIN = 12
# Config keys that say how a stage trained, in the order a card shows them.
TRAINING_KEYS = ("method", "arch", "steps", "epochs", "shots", "batch_size", "budget", "per_round")
# `_DONE.json` extras that count the labels a stage trained on.
LABEL_COUNTS = ("trained_on", "labels")
ROUNDS = "rounds.jsonl"


def output_of(uri: str) -> str | None:
    """The finished stage output a model URI points into: the URI itself, or the folder of a
    checkpoint file inside one; None for a file brought in from elsewhere."""
    uri = store.normalize(uri)
    for candidate in (uri, uri.rsplit("/", 1)[0]):
        if store.exists(store.join(candidate, stage.DONE)):
            return candidate
    return None


def _samples(uris: str) -> int | None:
    """Images in the data set(s) of an input (pretraining joins several with commas); None when
    one is not an unsupft data set (a foreign source carries no count to read cheaply)."""
    try:
        return sum(read_info(uri).samples for uri in uris.split(",") if uri)
    except UserError:
        return None


def stage_entry(out: str) -> dict[str, Any]:
    """One link of a model's chain: the stage at `out`, its training settings and data sizes."""
    done = stage.read_done(out) or {}
    config_uri = store.join(out, stage.CONFIG)
    config = store.read_json(config_uri) if store.exists(config_uri) else {}
    entry: dict[str, Any] = {"stage": done.get("stage", config.get("stage", "?")), "uri": out}
    entry.update((key, config[key]) for key in TRAINING_KEYS if config.get(key) is not None)
    entry.update((key, done[key]) for key in LABEL_COUNTS if key in done)
    data = {name: _samples(value) for name, value in (done.get("inputs") or {}).items()
            if name not in ("init", "labels") and isinstance(value, str) and value}
    entry["data"] = {name: count for name, count in data.items() if count is not None}
    entry["unsupft"] = (done.get("versions") or {}).get("unsupft")
    return entry


def model_card(uri: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Architecture, input, what was loaded and the init chain (newest stage first) of a model."""
    chain: list[dict[str, Any]] = []
    current: str | None = uri
    seen: set[str] = set()
    while current and len(chain) < MAX_CHAIN:
        out = output_of(current)
        if out is None or out in seen:
            chain.append({"stage": "checkpoint", "uri": current})
            break
        seen.add(out)
        chain.append(stage_entry(out))
        current = ((stage.read_done(out) or {}).get("inputs") or {}).get("init") or None
    return {
        "architecture": meta.get("arch"),
        "in_channels": meta.get("in_channels"),
        "image_size": meta.get("image_size"),
        "loaded": describe(meta),
        "chain": chain,
        "unsupft": next((link["unsupft"] for link in chain if link.get("unsupft")), None),
    }


def label_rounds(name: str, uri: str) -> list[dict[str, Any]]:
    """The rounds of the label stage output at `uri` (round, labels, test_top1), for `--label NAME=URI`:
    one line when it is no label output or its rounds were not scored against a test set."""
    uri = store.normalize(uri)
    done = stage.read_done(uri)
    rounds_uri = store.join(uri, ROUNDS)
    if (done is not None and done.get("stage") != "label") or not store.exists(rounds_uri):
        raise UserError(f"--label {name}={uri}: not a label stage output (no {ROUNDS})")
    rounds = [json.loads(line) for line in store.read_text(rounds_uri).splitlines() if line.strip()]
    if not rounds or any(r.get("test_top1") is None for r in rounds):
        raise UserError(f"--label {name}={uri}: its rounds have no test accuracy (run label with --test)")
    return sorted(({"round": int(r["round"]), "labels": int(r["labels"]), "test_top1": float(r["test_top1"])}
                   for r in rounds), key=lambda r: r["round"])
