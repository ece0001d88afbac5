"""One writer at a time: a lease object in the store, taken and renewed with conditional writes.

A stage holds `<out>/_LEASE.json` while it writes its output; the controller holds
`<store>/runs/<id>/_LEASE.json` while it drives a run. The lease works the same on a local disk and on
S3 because it needs only two store operations: `create_exclusive` (S3 `If-None-Match: *`, local
O_EXCL) and `replace_if`, a compare-and-swap (S3 `If-Match: <etag>`, local `flock`).

- Taking: create the object; if one is there, take it over with a compare-and-swap when it is
  released or its holder is gone: a process on this host that no longer runs (pid and start time),
  or, for a holder on another host, no renewal for its `ttl` seconds (we wait that long at most,
  watching for a renewal). A live holder means `LeaseHeld`: one line, exit code 69.
- Holding: a daemon thread renews the lease every `ttl/4` seconds, also by compare-and-swap. If the
  swap fails (another process took the lease: we were presumed dead) or the store stays unreachable,
  the process stops at once with one line and exit code 69 rather than keep writing beside a
  successor. `check()` renews once more before a final write.
- Releasing: a compare-and-swap to a "released" record (the object stays: a record of the last
  holder, and deleting it could race with a successor's swap).

`UNSUPFT_LEASE_SECONDS` sets the ttl (default 60).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from unsupft import store
from unsupft.errors import EXIT_INFRA, InfraError, ReportedError

LEASE = "_LEASE.json"
TTL_ENV = "UNSUPFT_LEASE_SECONDS"
DEFAULT_TTL = 60.0


class LeaseHeld(InfraError):
    """Another live process holds the lease (exit 69: the same command may succeed later)."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live process from a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def process_alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = process_start(pid)
    if now is None:  # no /proc (macOS): trust kill(0)
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return start is None or now == start


def describe(record: dict[str, Any]) -> str:
    """Who holds a lease, for messages: `unsupft pretrain (pid 12, host h, renewed 3s ago)`."""
    age = time.time() - float(record.get("renewed", 0))
    return f"{record.get('purpose', '?')} (pid {record.get('pid')}, host {record.get('host')}, renewed {age:.0f}s ago)"


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _gone(record: dict[str, Any] | None) -> bool:
    """Whether a holder is certainly gone: released, unreadable, or a dead process on this host."""
    if record is None or record.get("released"):
        return True
    return record.get("host") == socket.gethostname() and not process_alive(record.get("pid"), record.get("pid_start"))


class Lease:
    """A held lease; see the module docstring. Use `acquire` to get one."""

    def __init__(self, uri: str, record: dict[str, Any], version: str, ttl: float) -> None:
        self.uri, self.record, self.version, self.ttl = uri, record, version, ttl
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {uri}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _swap(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self.version is None:
                return
            version = store.replace_if(self.uri, json.dumps(record).encode(), self.version)
            if version is None:
                self.version = None
                raise InfraError(f"{self.uri}: lost the writer lease to another process (this one was presumed "
                                 f"dead: no renewal for {self.ttl:g}s); stopped so that only one writes")
            self.version = version

    def check(self) -> None:
        """Renew now; raise `InfraError` when the lease was lost (call before a final write)."""
        self._swap({**self.record, "renewed": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.check()
            except ReportedError as exc:
                # A lost lease (or a store gone past its retries): stop writing at once, whatever
                # the main thread is doing; a successor may already be writing.
                print(f"error: {exc}", file=sys.stderr, flush=True)
                os._exit(EXIT_INFRA)

    def release(self) -> None:
        """Give the lease up (idempotent); a lost lease or an unreachable store is left to expire."""
        self._stop.set()
        atexit.unregister(self.release)
        with contextlib.suppress(ReportedError):
            self._swap({**self.record, "released": True, "renewed": time.time()})
        with self._lock:
            self.version = None


def acquire(uri: str, purpose: str, what: str) -> Lease:
    """Take the lease at `uri` for `purpose` (e.g. "unsupft pretrain"), or raise `LeaseHeld`.

    `what` names the thing guarded in the message (an output URI, a run).
    """
    ttl = store.env_seconds(TTL_ENV, DEFAULT_TTL, 1, 86400)
    record = {"purpose": purpose, "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": process_start(os.getpid()), "ttl": ttl, "acquired": time.time()}
    while True:
        record["renewed"] = time.time()
        data = json.dumps(record).encode()
        version = store.create_exclusive(uri, data)
        if version is not None:
            return Lease(uri, record, version, ttl)
        current = store.read_versioned(uri)
        if current is None:  # removed in between (an output cleaned): create again
            continue
        held = _parse(current[0])
        if not _gone(held):
            assert held is not None
            busy = LeaseHeld(f"{what} is in use by {describe(held)}; one writer at a time (retry when it has "
                             f"finished, or after {float(held.get('ttl', ttl)):g}s without renewal)")
            if held.get("host") == socket.gethostname():
                raise busy
            latest = _wait_for_expiry(uri, held, current)
            if latest is None or (latest[1] != current[1] and _gone(_parse(latest[0]))):
                continue  # removed or released while we watched: take it on the next pass
            if latest[1] != current[1]:
                raise busy
        version = store.replace_if(uri, data, current[1])
        if version is not None:
            return Lease(uri, record, version, ttl)
        # Someone else changed it between our read and our swap: look again.


def _wait_for_expiry(uri: str, held: dict[str, Any], current: tuple[bytes, str]) -> tuple[bytes, str] | None:
    """Watch a holder on another host until it renews or its ttl runs out: the object as last read
    (unchanged: expired), or None when it was removed."""
    ttl = float(held.get("ttl", DEFAULT_TTL))
    expires = float(held.get("renewed", 0)) + ttl
    while time.time() < expires:
        time.sleep(min(1.0, ttl / 8, max(0.05, expires - time.time())))
        latest = store.read_versioned(uri)
        if latest is None or latest[1] != current[1]:
            return latest
    return current
