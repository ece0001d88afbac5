"""Run state in the store: `<store>/runs/<run-id>/run.json` plus each stage's output prefix.

run.json holds the frozen pipeline, and per stage its state, attempts, timings, the command and
the cache key. It is created complete in one conditional write (`store.create_exclusive`), so one
run id is never created twice. Only the run's one controller (the local `run` process or the
in-cluster driver) rewrites it, atomically: a controller first takes the run's lease
(`<run>/_LEASE.json`, see `unsupft.lease`) in one conditional write, so of two `run` commands started
together exactly one drives the run and the other stops with one line. `status` and `fetch` only read,
from anywhere.

A stage is *cached* when its recorded key equals the key of the current pipeline and its
`_DONE.json` carries the config hash recorded when it finished: then a re-run skips it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import click

from unsupft import lease, store
from unsupft import stage as stage_contract
from unsupft.ctl.command import stage_args, stage_keys
from unsupft.ctl.spec import Pipeline
from unsupft.errors import UserError

PENDING, RUNNING, WAITING, SUCCEEDED, FAILED, CANCELLED = (
    "pending", "running", "waiting-for-labels", "succeeded", "failed", "cancelled",
)
INTERRUPTED = "interrupted"  # stopped with its (local) controller; the next run or `resume` continues it
RUN_FILE = "run.json"
CANCEL_FILE = "_CANCEL"
LOGS = "_logs"


def run_uri(store_uri: str, run_id: str) -> str:
    return store.join(store_uri, "runs", run_id)


@dataclass
class Run:
    """The mutable record of one run; `save()` writes it back."""

    uri: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def stage_uri(self, name: str) -> str:
        return store.join(self.uri, name)

    def log_uri(self, name: str, attempt: int | None = None) -> str:
        attempt = self.stages[name]["attempts"] if attempt is None else attempt
        return store.join(self.uri, LOGS, f"{name}.{attempt}.log")

    def save(self) -> None:
        self.data["updated"] = time.time()
        store.write_json(store.join(self.uri, RUN_FILE), self.data)

    def set(self, name: str, **fields: Any) -> None:
        self.stages[name].update(fields)
        self.save()

    def cancel_requested(self) -> bool:
        return store.exists(store.join(self.uri, CANCEL_FILE))

    def request_cancel(self) -> None:
        store.write_text(store.join(self.uri, CANCEL_FILE), f"{time.time()}\n")

    def is_cached(self, name: str) -> bool:
        """Finished before with the same command and upstream: its `_DONE.json` still matches."""
        rec = self.stages[name]
        if rec["key"] != rec.get("done_key") or not rec.get("done_hash"):
            return False
        done = stage_contract.read_done(self.stage_uri(name))
        return done is not None and done.get("config_hash") == rec["done_hash"]

    def accept_done(self, name: str) -> bool:
        """Record a stage whose `_DONE.json` appeared (it ran under the current key) as succeeded."""
        done = stage_contract.read_done(self.stage_uri(name))
        if done is None:
            return False
        rec = self.stages[name]
        self.set(name, state=SUCCEEDED, done_key=rec["key"], done_hash=done.get("config_hash"),
                 finished=rec.get("finished") or time.time(), message="")
        return True


def new_record(pipeline: Pipeline, run_id: str, backend: str, **extra: Any) -> dict[str, Any]:
    uri = run_uri(pipeline.store, run_id)
    keys = stage_keys(pipeline, uri)
    return {
        "format": "unsupft-run/1",
        "run_id": run_id,
        "pipeline": pipeline.name,
        "store": pipeline.store,
        "backend": backend,
        "created": time.time(),
        "spec": pipeline.source,
        "order": list(pipeline.stages),
        "stages": {
            name: {"kind": st.kind, "needs": list(st.needs), "state": PENDING, "attempts": 0,
                   "command": stage_args(st, uri), "key": keys[name], "started": None, "finished": None}
            for name, st in pipeline.stages.items()
        },
        **extra,
    }


def create(pipeline: Pipeline, run_id: str, backend: str, **extra: Any) -> Run | None:
    """Create run.json exclusively; None when the run id is already taken."""
    uri = run_uri(pipeline.store, run_id)
    data = new_record(pipeline, run_id, backend, **extra)
    if not store.create_exclusive(store.join(uri, RUN_FILE), json.dumps(data, indent=1).encode()):
        return None
    return Run(uri, data)


def open_run(store_uri: str, run_id: str) -> Run:
    uri = run_uri(store_uri, run_id)
    path = store.join(uri, RUN_FILE)
    if not store.exists(path):
        raise UserError(f"{uri}: no such run (no {RUN_FILE})")
    return Run(uri, store.read_json(path))


def refresh(run: Run, pipeline: Pipeline) -> None:
    """Bring an existing run up to a (possibly edited) pipeline: new keys re-run changed stages."""
    fresh = new_record(pipeline, run.run_id, run.data["backend"])
    old = run.stages
    for name, rec in fresh["stages"].items():
        prev = old.get(name)
        if prev is None:
            continue
        rec.update({keep: prev[keep] for keep in ("attempts", "started", "finished", "done_key", "done_hash", "pid",
                                                  "pid_start", "host", "exit_code", "message", "object", "started_key", "created")
                    if keep in prev})
        rec["state"] = prev["state"] if prev["key"] == rec["key"] else PENDING
    run.data.update(spec=fresh["spec"], order=fresh["order"], stages=fresh["stages"])
    run.save()


def controller_alive(run: Run) -> bool:
    """Is the process that last drove this run still alive (same host only)?"""
    ctl = run.data.get("controller") or {}
    return ctl.get("host") == socket.gethostname() and lease.process_alive(ctl.get("pid"), ctl.get("pid_start"))


def take(run: Run) -> None:
    """Become the run's one controller (its lease, held until the command ends), or `LeaseHeld`."""
    held = lease.acquire(store.join(run.uri, lease.LEASE), "unsupft-ctl", f"run {run.run_id}")
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(held.release)
