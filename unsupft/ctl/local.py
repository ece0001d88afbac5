"""The local backend: every stage a child process on this machine, chained in DAG order.

Each stage runs as `python -m unsupft <kind> ...` in its own process group (its own session), so
that `cancel` can stop it together with its data-loader workers and nothing is left behind, and so
that a controller killed with SIGKILL does not take running stages with it. A restarted controller
re-reads run.json: a stage recorded as running whose process is still alive is adopted (waited
for), one whose process is gone counts as done if its `_DONE.json` appeared, else it runs again
(and resumes from its checkpoint).

A controller told to stop (SIGTERM from a scheduler, `timeout` or systemd; SIGINT from Ctrl-C) does
not leave its stages running unwatched: it sends each running stage's group SIGTERM (SIGKILL after
`KILL_GRACE_S`, or at once on a second signal), records those stages as interrupted, prints one
line naming them and exits 128 + the signal's number (143, 130), as a shell reports a process a
signal ended. The next `run` (or `resume`) starts them again and they resume from their last
checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, NoReturn

from unsupft import store
from unsupft.ctl import state as st
from unsupft.ctl.spec import Pipeline
from unsupft.errors import EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS, ReportedError
from unsupft.lease import process_alive, process_start
from unsupft.registry import option_env_prefixes
from unsupft.trust import TRUST_ENV

POLL_S = 0.2
LOG_UPLOAD_S = 10.0
KILL_GRACE_S = 10.0


def stage_program() -> list[str]:
    """How stages are started: `UNSUPFT_STAGE_PROGRAM` (e.g. a wrapper) or this Python's unsupft."""
    custom = os.environ.get("UNSUPFT_STAGE_PROGRAM")
    return shlex.split(custom) if custom else [sys.executable, "-m", "unsupft"]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(ReportedError):
    """The controller was stopped by a signal after stopping its stages: exit 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def kill_groups(pids: Iterable[int], hurry: Callable[[], bool] = lambda: False) -> None:
    """SIGTERM the process groups led by `pids`, then SIGKILL whatever is left after `KILL_GRACE_S`
    (or as soon as `hurry()` is true). The groups are signalled together, so stopping several
    stages takes one grace period, not one each."""
    left = set(pids)
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 2.0)):
        for pid in list(left):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                left.discard(pid)
        deadline = time.time() + wait
        while left and time.time() < deadline and not (sig == signal.SIGTERM and hurry()):
            for pid in list(left):
                try:
                    os.killpg(pid, 0)
                except ProcessLookupError:
                    left.discard(pid)
                with contextlib.suppress(ChildProcessError):  # reap our own child, or it lingers as a zombie
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


@contextlib.contextmanager
def signals_recorded(received: list[int]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT are appended to `received` instead of ending the process, so
    that the controller can stop its stages first. Only the main thread may set handlers: called
    from another thread, the signals keep theirs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _Proc:
    pid: int
    popen: subprocess.Popen | None  # None when adopted from an earlier controller
    start: str | None
    log: IO[bytes] | None
    log_path: Path | None
    uploaded: float = 0.0

    def exit_code(self) -> int | None:
        """The exit code when finished (None for an adopted process, whose code is unknowable)."""
        return self.popen.poll() if self.popen is not None else None

    def finished(self) -> bool:
        return self.popen.poll() is not None if self.popen is not None else not process_alive(self.pid, self.start)


def default_parallel() -> int:
    """Stages run at once by default: one per two cores (at least one, at most four).

    Each training stage keeps its cores busy with OpenMP threads and DataLoader workers; two stages
    sharing two cores made a small MoCo step 10x slower (threads spinning against each other), so
    on a small machine stages take turns instead.
    """
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def stage_env(max_parallel: int) -> dict[str, str]:
    """A child stage's environment: half its share of the cores as OpenMP threads (the other half
    runs its DataLoader workers), unless the user chose. On 2 cores, 2 threads beside 1 worker made
    a MoCo step 5-10x slower than 1 thread (spinning OpenMP threads; BENCHMARKS.md, "Threads").

    The pipeline file alone says what a stage does: stage options from the controller's own
    environment (`UNSUPFT_<STAGE>_<OPTION>`) would change stages behind their cache keys, and
    the checkpoint trust must be asked for per stage (`trust_checkpoint: true`), so neither is
    passed on."""
    dropped = option_env_prefixes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and k != TRUST_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max_parallel // 2)))
    return env


class LocalBackend:
    def __init__(self, run: st.Run, pipeline: Pipeline, *, max_parallel: int | None = None,
                 echo: Callable[[str], None] = print) -> None:
        self.run, self.pipeline, self.echo = run, pipeline, echo
        self.max_parallel = max_parallel or default_parallel()
        self.procs: dict[str, _Proc] = {}
        self.t0 = time.time()
        self.retries_left = {n: s.resources.retries for n, s in pipeline.stages.items()}

    # ------------------------------------------------------------------------------ entry ---
    def execute(self) -> bool:
        """Run the pipeline to the end (or to a cancel); True when every stage succeeded.
        Raises `Stopped` after a SIGTERM or SIGINT (see the module's docstring)."""
        self.run.data["controller"] = {"host": socket.gethostname(), "pid": os.getpid(),
                                       "pid_start": process_start(os.getpid())}
        self.run.save()
        received: list[int] = []
        with signals_recorded(received):
            self._reconcile()
            while True:
                if received:
                    self._interrupt(received)
                if self.run.cancel_requested():
                    self._cancel()
                    return False
                self._poll()
                self._start_ready()
                if not self.procs and not self._startable():
                    break
                time.sleep(POLL_S)
        return all(r["state"] == st.SUCCEEDED for r in self.run.stages.values())

    # ---------------------------------------------------------------------------- phases ---
    def _reconcile(self) -> None:
        """Settle what an earlier controller left: cached, adopted, finished or to be re-run."""
        host = socket.gethostname()
        for name, rec in self.run.stages.items():
            if self.run.is_cached(name):
                if rec["state"] != st.SUCCEEDED:
                    self.run.set(name, state=st.SUCCEEDED)
                self._event(name, "cached")
                continue
            if rec["state"] == st.RUNNING and rec.get("host") == host and process_alive(rec.get("pid"), rec.get("pid_start")):
                self.procs[name] = _Proc(rec["pid"], None, rec.get("pid_start"), None, None)
                self._event(name, f"adopted (pid {rec['pid']})")
                continue
            if rec["state"] == st.RUNNING and rec.get("started_key") == rec["key"] and self.run.accept_done(name):
                self._event(name, "succeeded (finished while no controller watched)")
                continue
            if rec["state"] != st.PENDING:
                self.run.set(name, state=st.PENDING, message="")

    def _startable(self) -> list[str]:
        recs = self.run.stages
        return [n for n, r in recs.items()
                if r["state"] == st.PENDING and n not in self.procs
                and all(recs[d]["state"] == st.SUCCEEDED for d in r["needs"])]

    def _start_ready(self) -> None:
        for name in self._startable():
            if len(self.procs) >= self.max_parallel:
                return
            self._start(name)

    def _start(self, name: str) -> None:
        rec = self.run.stages[name]
        out = self.run.stage_uri(name)
        if rec.get("started_key") not in (None, rec["key"]):
            store.delete_prefix(out)  # output of a different command: never resume from it
        attempt = rec["attempts"] + 1
        log_uri = self.run.log_uri(name, attempt)
        local = store.local_path(log_uri)
        if local is None:
            fd, tmp = tempfile.mkstemp(prefix=f"unsupft-{name}-", suffix=".log")
            os.close(fd)
            local = Path(tmp)
        local.parent.mkdir(parents=True, exist_ok=True)
        log = open(local, "ab")
        argv = stage_program() + rec["command"]
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=stage_env(self.max_parallel))
        start = process_start(popen.pid)
        self.procs[name] = _Proc(popen.pid, popen, start, log, local if store.is_s3(log_uri) else None)
        self.run.set(name, state=st.RUNNING, attempts=attempt, started=time.time(), finished=None,
                     pid=popen.pid, pid_start=start, host=socket.gethostname(), started_key=rec["key"],
                     exit_code=None, message="")
        self._event(name, f"running (attempt {attempt}, pid {popen.pid})")

    def _poll(self) -> None:
        for name, proc in list(self.procs.items()):
            self._upload_log(name, proc, force=False)
            if not proc.finished():
                continue
            code = proc.exit_code()
            self._close(name)
            rec = self.run.stages[name]
            self.run.set(name, finished=time.time(), exit_code=code, pid=None)
            if code == EXIT_WAITING_FOR_LABELS:
                self.run.set(name, state=st.WAITING, message="waiting for labels; label the exported batch, then run again")
                self._event(name, "waiting-for-labels")
            elif code in (0, None) and self.run.accept_done(name):
                self._event(name, f"succeeded in {rec['finished'] - rec['started']:.1f}s")
            else:
                why = f"exit code {code}" if code not in (0, None) else "ended without writing _DONE.json"
                if self.retries_left[name] > 0 and code != EXIT_USER_ERROR:  # bad input fails the same way again
                    self.retries_left[name] -= 1
                    self.run.set(name, state=st.PENDING, message=f"retrying after {why}")
                    self._event(name, f"failed ({why}), retrying")
                else:
                    self.run.set(name, state=st.FAILED, message=f"{why}; see unsupft-ctl logs {self.run.run_id} {name}")
                    self._event(name, f"failed ({why})")

    def _close(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.log is not None:
            proc.log.close()
        self._upload_log(name, proc, force=True)
        if proc.log_path is not None:
            proc.log_path.unlink(missing_ok=True)

    def _upload_log(self, name: str, proc: _Proc, *, force: bool) -> None:
        if proc.log_path is None or (not force and time.time() - proc.uploaded < LOG_UPLOAD_S):
            return
        store.upload_file(proc.log_path, self.run.log_uri(name))
        proc.uploaded = time.time()

    def _interrupt(self, received: list[int]) -> NoReturn:
        """Stop every running stage (a second signal skips the grace period) and record it as
        interrupted, unless it finished meanwhile; then raise `Stopped` naming them."""
        why = signal.Signals(received[0]).name
        kill_groups([proc.pid for proc in self.procs.values()], hurry=lambda: len(received) > 1)
        interrupted = []
        for name in list(self.procs):
            self._close(name)
            self.run.set(name, finished=time.time(), pid=None)
            if self.run.accept_done(name):
                self._event(name, "succeeded while the controller stopped")
                continue
            self.run.set(name, state=st.INTERRUPTED, message=f"interrupted: the controller got {why}; run again to resume")
            self._event(name, f"interrupted ({why})")
            interrupted.append(name)
        stages = f"interrupted {', '.join(interrupted)}" if interrupted else "no stage was running"
        raise Stopped(f"stopped by {why}: {stages}; run again (or `unsupft-ctl resume {self.run.run_id}`) "
                      "to continue where it stopped", received[0])

    def _stop(self, name: str, new_state: str, message: str) -> None:
        kill_groups([self.procs[name].pid])
        self._close(name)
        self.run.set(name, state=new_state, finished=time.time(), pid=None, message=message)
        self._event(name, message)

    def _cancel(self) -> None:
        for name in list(self.procs):
            self._stop(name, st.CANCELLED, "cancelled")
        for name, rec in self.run.stages.items():
            if rec["state"] == st.PENDING:
                self.run.set(name, state=st.CANCELLED, message="cancelled before it started")

    def _event(self, name: str, what: str) -> None:
        elapsed = time.time() - self.t0
        self.echo(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {name:<16} {what}")


def cancel_local(run: st.Run) -> None:
    """Stop a local run from outside its controller: mark it, then kill the stages' groups here.

    The controller (if alive) sees the mark and records the stages as cancelled; if it is gone,
    the states are recorded here.
    """
    run.request_cancel()
    host = socket.gethostname()
    kill_groups([rec["pid"] for rec in run.stages.values()
                 if rec["state"] == st.RUNNING and rec.get("host") == host and process_alive(rec.get("pid"), rec.get("pid_start"))])
    if not st.controller_alive(run):
        for name, rec in run.stages.items():
            if rec["state"] in (st.RUNNING, st.PENDING, st.WAITING, st.INTERRUPTED):
                run.set(name, state=st.CANCELLED, pid=None, finished=time.time(), message="cancelled")
