"""The stage contract shared by every `unsupft <stage>` command (docs/architecture.md, "The stage contract").

A stage writes into its output URI: `config.json` first, its artifacts, and last `_DONE.json`
(config hash, inputs, outputs, versions, timings). Every stage goes through it the same way:

    run = stage.start("transfer", out, options, inputs={"init": init, "train": train})
    if run is None:
        return                       # done under this config: nothing was read
    ...read and check the inputs...
    run.claim(image_size=size)       # config.json, with what was resolved from the data
    ...train, write artifacts...
    run.finish(trained_on=n)         # _DONE.json: the outputs are the files in --out

The config hash covers the options and the manifests of the inputs (a stage output's config
hash, a data set's `dataset.json`), never facts read from the data (image size, samples per
epoch: recorded under "resolved" in config.json), so a finished stage skips before it opens its
data or loads a model, and a stage whose input changed at the same URI runs again. The controller
skips a stage whose `_DONE.json` holds the config hash it recorded.

Outputs are owned, here once for every stage:
- By one config. `is_done` and `write_config` refuse an output that holds another config's files,
  finished or partial (one line naming the keys that differ), or files no stage wrote; with
  `--overwrite` (`StageOptions`) the files the stages write (`WRITTEN`) are deleted from another
  config's output and the stage starts clean. Nothing else is ever deleted: a folder without a
  stage's config.json (a home folder, a bucket root, another tool's output) or an output that also
  holds files of someone else is refused with `--overwrite` too, naming them. A rerun with the
  same config resumes, and the training loop checks that a checkpoint it resumes from was written
  under this config (`owner`).
- By one writer. `write_config` takes the output's lease (`unsupft.lease`, `<out>/_LEASE.json`)
  before its first write and `write_done` gives it up after its last, so a second process writing
  the same output stops with one line (exit 69) instead of mixing its files into the first's.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import click

from unsupft import __version__, lease, options, store, trust
from unsupft.errors import UserError
from unsupft.registry import STAGES

DONE = "_DONE.json"
CONFIG = "config.json"
METRICS_FILE = "metrics.jsonl"
DATASET_MANIFEST = "dataset.json"  # what identifies a data set input (written by unsupft.data.shards)
RESOLVED = "resolved"  # the config.json key of facts read from the data: recorded, not hashed

# The files of one training run (any stage's output, and the runs stages keep inside their own).
_RUN_FILES = (CONFIG, DONE, lease.LEASE, METRICS_FILE, "checkpoint.pt", "model.pt", "moco.pt",
              "events.out.tfevents.*", "train_keys.txt", "test.json")
# Every file a stage writes into its output, as patterns of its path there (`*` also spans
# folders): what `--overwrite` deletes, and `_DONE.json` lists. A stage that writes a new name adds
# it here (tests/test_bad_inputs_outputs.py checks the stages' outputs against it); one missing
# makes `--overwrite` refuse the output, never delete a file unsupft did not write. A label
# round's answers (labels/round-N.csv) are a person's work, and not among them.
WRITTEN = (
    *_RUN_FILES,
    "report.json", "report.html", "feature_map.png", "fewshot_curves.png", "label_curves.png",  # evaluate
    "study.json", "study.md", "study.html",  # study
    "ranking.json", "ranking.md", *(f"candidates/*/{name}" for name in _RUN_FILES),  # select-source
    "state.json", "labels.csv", "rounds.jsonl", *(f"rounds/round-*/{name}" for name in _RUN_FILES),  # label
    "requests/classes.json", "requests/round-*.csv", "requests/round-*/*.png", "labels/round-*.progress.json",
)

# This process's claims: output URI -> (its lease, the config hash it writes under).
_claims: dict[str, tuple[lease.Lease, str]] = {}
# Whether this invocation's --overwrite was given (set by the option's callback, per invocation).
_overwrite = False


def _set_overwrite(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _overwrite
    _overwrite = bool(value)
    return value


@dataclass(frozen=True, kw_only=True)
class StageOptions(options.Options):
    """The options every stage takes besides its own (they close its `--help`): where it writes,
    and two switches that change nothing it computes. A stage whose `--out` help says more declares
    `out` again."""

    out: str = options.option(help="Output URI (directory or s3://bucket/prefix).", hashed=False)
    trust_checkpoint: bool = options.option(
        False, is_flag=True, envvar=trust.TRUST_ENV, callback=trust.set_trust, hashed=False,
        help=f"Load pickled checkpoints that hold more than tensors (config objects) with the full "
             f"unpickler, which can run code from the file: only for files you trust. Also {trust.TRUST_ENV}=1.")
    overwrite: bool = options.option(
        False, is_flag=True, callback=_set_overwrite, hashed=False,
        help="Replace another config's output in --out (finished or partial): delete the files unsupft wrote "
             "there first, instead of refusing it. Files unsupft did not write are never deleted.")


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != RESOLVED}


def config_hash(config: dict[str, Any]) -> str:
    """Stable hash of a stage's config (keys sorted, JSON-encoded), without what was resolved."""
    blob = json.dumps(_identity(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import torch

    return {"unsupft": __version__, "torch": torch.__version__, "python": platform.python_version()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """`seed 0 -> 1, steps 100 -> 200` for the keys whose values differ (at most 6 named)."""
    old, new = _identity(old), _identity(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "(absent)") != new.get(k, "(absent)"))

    def short(value: Any) -> str:
        text = json.dumps(value, default=str) if value != "(absent)" else value
        return text if len(text) <= 40 else text[:37] + "..."

    named = [f"{k} {short(old.get(k, '(absent)'))} -> {short(new.get(k, '(absent)'))}" for k in keys[:6]]
    return ", ".join(named) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def written_by_unsupft(name: str) -> bool:
    """Whether `name` (a path inside an output) is one of the files the stages write (`WRITTEN`)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WRITTEN)


def _is_stage_config(value: Any) -> bool:
    """Whether a config.json holds what `start` writes (another tool's config.json does not)."""
    return isinstance(value, dict) and value.get("stage") in STAGES


def _named(names: Sequence[str], shown: int = 3) -> str:
    """`3 files: a, b, c` or `12 files: a, b, c and 9 more`, for a one-line message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} file{'s' if len(names) != 1 else ''}: {', '.join(names[:shown])}{more}"


def _foreign(out: str, config: dict[str, Any]) -> list[str]:
    """The files to delete from `out` before `config` writes there: none when it is this config's
    (empty, or holding this config), else, with --overwrite, another config's output's files,
    which unsupft wrote. Refused (one line) without --overwrite, and with it wherever a file is
    not unsupft's: the files `--overwrite` would have deleted before are named."""
    names = [n for n in store.list_prefix(out) if n != lease.LEASE]
    if not names:
        return []
    # one listing, then the config: a writer starting meanwhile is seen whole
    existing = store.read_json(store.join(out, CONFIG)) if CONFIG in names else None
    overwrite_note = "; --overwrite deletes only what unsupft wrote" if _overwrite else ""
    if not _is_stage_config(existing):
        what = f"holds a {CONFIG} no unsupft stage wrote" if CONFIG in names else f"holds no {CONFIG}"
        raise UserError(f"{out}: is not empty and {what}, so it is not a stage output ({_named(names)})"
                        f"{overwrite_note}; use another --out")
    if config_hash(existing) == config_hash(config):
        return []
    why = f"holds the output of another config ({differences(existing, config)})"
    others = [n for n in names if not written_by_unsupft(n)]
    if others:
        raise UserError(f"{out}: {why} and files unsupft did not write ({_named(others)}){overwrite_note}; "
                        f"use another --out")
    if not _overwrite:
        raise UserError(f"{out}: {why}; use another --out, or --overwrite to replace it")
    return names


def write_config(out: str, config: dict[str, Any]) -> None:
    """Claim `out` for `config` (its writer lease, then the ownership check) and write config.json:
    every stage calls this before its first write to `out`."""
    if out not in _claims:
        held = lease.acquire(store.join(out, lease.LEASE), f"unsupft {config.get('stage', 'stage')}", out)
        try:
            for name in _foreign(out, config):  # only with --overwrite: unsupft's files, deleted
                store.delete(store.join(out, name))
        except BaseException:
            held.release()
            raise
        _claims[out] = (held, config_hash(config))
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # give the output up when the command ends, however it ends
            ctx.call_on_close(lambda: _release(out))
    elif _claims[out][1] != config_hash(config):
        raise UserError(f"{out}: claimed for another config by this process")
    store.write_json(store.join(out, CONFIG), config)


def _release(out: str) -> None:
    claim = _claims.pop(out, None)
    if claim is not None:
        claim[0].release()


def owner(uri: str) -> str | None:
    """The config hash this process writes `uri` (or the output holding it) under; None when it
    holds no claim there (a library call outside a stage)."""
    for out, (_, digest) in _claims.items():
        if uri == out or uri.startswith(out.rstrip("/") + "/"):
            return digest
    return None


def read_done(out: str) -> dict[str, Any] | None:
    """The stage's `_DONE.json`, or None when it has not finished."""
    uri = store.join(out, DONE)
    return store.read_json(uri) if store.exists(uri) else None


def is_done(out: str, config: dict[str, Any]) -> bool:
    """Whether `out` is finished under `config`; an output of another config is refused here, before
    the stage spends time reading its inputs (unless --overwrite, which `write_config` carries out)."""
    done = read_done(out)
    if done is not None and done.get("config_hash") == config_hash(config):
        return True
    _foreign(out, config)  # refuses it here unless --overwrite
    return False


def write_done(out: str, stage: str, config: dict[str, Any], inputs: dict[str, str], outputs: Iterable[str],
               started: float, **extra: Any) -> dict[str, Any]:
    """Write `_DONE.json` last: from here on the stage counts as complete. The writer lease is
    renewed first (a process that lost it must not mark another's output done) and given up after."""
    claim = _claims.get(out)
    if claim is not None:
        claim[0].check()
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
    _release(out)
    return manifest


# `chosen:<URI>` names the data set a finished `select-source` output at URI chose (its `_DONE.json`
# holds `chosen: {name, uri}`): how a pipeline passes that choice on (docs/semi.md, "In pipelines").
CHOSEN_PREFIX = "chosen:"


def resolve_chosen(value: str) -> str:
    """`chosen:<select-source output>` -> the URI of the data set it chose; any other value unchanged.

    Resolved by the stage that reads the input, from the store, so the controller renders the same
    command line before the choice exists, locally and on a cluster, and the stage's config (and
    with it its config hash and its outputs' owner) names the chosen data set itself."""
    if not value.startswith(CHOSEN_PREFIX):
        return value
    out = store.normalize(value[len(CHOSEN_PREFIX):])
    done = read_done(out)
    if done is None:
        raise UserError(f"{value}: {out} is not a finished stage output (no {DONE}); run its select-source stage first")
    chosen = done.get("chosen")
    if done.get("stage") != "select-source" or not isinstance(chosen, dict) or not isinstance(chosen.get("uri"), str):
        raise UserError(f"{value}: {out} is a '{done.get('stage')}' output, not a select-source one (no chosen source)")
    click.echo(f"{value}: the chosen source '{chosen.get('name')}' ({chosen['uri']})", err=True)
    return chosen["uri"]


def input_manifest(uri: str) -> str | None:
    """What identifies an input's content without reading its data: a stage output's config hash,
    the hash of a data set's manifest; None for anything else (a checkpoint file, shards named by
    a pattern), which is known by its URI alone."""
    done = read_done(uri)
    if done is not None:
        return done.get("config_hash")
    manifest = store.join(uri, DATASET_MANIFEST)
    return hashlib.sha256(store.read_bytes(manifest)).hexdigest()[:16] if store.exists(manifest) else None


@dataclass
class StageRun:
    """One stage invocation on its output, made by `start` once the output was found not done."""

    name: str
    out: str
    config: dict[str, Any]
    inputs: dict[str, str]
    started: float = field(default_factory=time.time)

    def claim(self, **resolved: Any) -> None:
        """Take the output (writer lease, ownership check) and write config.json, with the facts
        resolved from the data under "resolved". Call it before the first write to the output."""
        if resolved:
            self.config[RESOLVED] = resolved
        write_config(self.out, self.config)

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Write `_DONE.json`: the stage is complete, its outputs are the files it wrote there."""
        outputs = [n for n in store.list_prefix(self.out) if n not in (lease.LEASE, DONE) and written_by_unsupft(n)]
        return write_done(self.out, self.name, self.config, self.inputs, outputs, self.started, **extra)


def start(name: str, out: str, options: dict[str, Any],
          inputs: dict[str, str | Sequence[str] | None]) -> StageRun | None:
    """The stage `name` with these options on `out`, or None (after saying so) when `out` is done
    under them. `inputs` are the options naming data sets, models or files (None: not given)."""
    uris = {k: [v] if isinstance(v, str) else list(v) for k, v in inputs.items() if v}
    config = {"stage": name, **options,
              "input_manifests": {k: [input_manifest(u) for u in given] for k, given in uris.items()}}
    if is_done(out, config):
        click.echo(f"{out}: already done (same config)", err=True)
        return None
    return StageRun(name, out, config, {k: ",".join(given) for k, given in uris.items()})

