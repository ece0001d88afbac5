"""The in-cluster driver (`unsupft-ctl drive RUN`, itself a Job): walks one run's DAG on the cluster.

It creates each stage's object once its inputs succeeded, watches it, and records every transition
in run.json first, so a restarted driver adopts what its predecessor created (by name, and only
when the object's run annotation says it is this run's). What it handles besides success:

- a failed attempt is deleted (foreground: its pods go first) before the next attempt starts,
  within `resources.<stage>.retries`; exit 2 (bad input) is never retried, exit 75 means waiting
  for labels;
- a ResourceQuota refusing the object keeps the stage pending with the reason;
- any other 4xx refusing the object (an admission webhook's denial, RBAC's Forbidden, a validation
  error) fails the stage at once with the API server's own message: the same object would be
  refused again;
- a stage object deleted by someone else (not by this driver) is a failed attempt, retried within
  `retries`, never silently recreated;
- pods stuck pending (image pull errors, unschedulable, pods refused by quota) are reported in
  `status` and fail the stage after `resources.<stage>.pending_timeout_s`;
- the run's ConfigMap gone (`helm uninstall`) means the run was removed: stop, create nothing;
- API hiccups are retried in `kubeapi.Api`; the driver returns (and exits 0) whenever the run
  reaches a final state, so its Job never restart-loops over an outcome.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from unsupft.ctl import state as st
from unsupft.ctl.kube import (ANNOTATION_RUN, LABEL_ATTEMPT, LABEL_RUN, LABEL_STAGE, QUEUE_LABEL, Context, exit_code_of,
                              job_kind, object_name, owner_reference, stage_object)
from unsupft.ctl.kubeapi import Api, QuotaExceeded, refusal
from unsupft.ctl.spec import Pipeline, Stage
from unsupft.errors import EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS, UserError

POLL_S = 10.0
# Container states and events that mean "this pod will not start by waiting a little".
STUCK_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError")


def stuck_reason(pods: list[dict[str, Any]], warnings: Callable[[], list[dict[str, Any]]], obj_name: str) -> str | None:
    """Why an attempt's pods are not running, or None when nothing is stuck.

    Read from pod status first (image pull errors, an Unschedulable PodScheduled condition), then,
    while no pod runs, from Warning events on the attempt's objects (a controller's FailedCreate:
    quota, admission); `warnings` lists the namespace's, only called when they are needed.
    """
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                return f"Unschedulable: {cond.get('message', '')}".rstrip(": ")
    if any((p.get("status") or {}).get("phase") in ("Running", "Succeeded") for p in pods):
        return None
    for event in sorted(warnings(), key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", reverse=True):
        if event.get("reason") == "FailedCreate" and (event.get("involvedObject") or {}).get("name", "").startswith(obj_name):
            return f"FailedCreate: {event.get('message', '')}"
    return None


class Driver:
    """Walks one run's DAG on the cluster; every decision is recorded in run.json first."""

    def __init__(self, run: st.Run, pipeline: Pipeline, api: Api, ctx: Context, *, poll_s: float | None = None,
                 echo: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 job_api: str | None = None) -> None:
        self.run, self.pipeline, self.api, self.ctx = run, pipeline, api, ctx
        self.poll_s, self.echo, self.clock = POLL_S if poll_s is None else poll_s, echo, clock
        self.job_api = job_api or run.data.get("job_api")
        self.ctx.run_uri = self.ctx.run_uri or run.uri

    def execute(self) -> None:
        """Drive until the run is final: succeeded, failed, cancelled or waiting for labels."""
        if not self._setup():
            return
        for name in self.run.stages:
            if self.run.is_cached(name):
                self.run.set(name, state=st.SUCCEEDED)
        while True:
            if self.run.cancel_requested():
                self._stop("cancelled")
                return
            if self.ctx.owner and self.api.configmap(self.ctx.namespace, self.ctx.owner["name"]) is None:
                self._stop(f"run removed (ConfigMap {self.ctx.owner['name']} deleted)")
                return
            if not self._step():
                return
            time.sleep(self.poll_s)

    def _setup(self) -> bool:
        """Find the owner object and the job API; False (run recorded as failed) when impossible."""
        owner = self.run.data.get("owner")
        if owner:
            configmap = self.api.configmap(self.ctx.namespace, owner)
            if configmap is None:
                self._stop(f"run removed (ConfigMap {owner} deleted)")
                return False
            self.ctx.owner = owner_reference(configmap)
        multi = any(s.resources.processes > 1 and s.resources.job_api == "auto" for s in self.pipeline.stages.values())
        try:
            self.ctx.job_api = self.job_api or (self.api.choose_job_api() if multi else self.ctx.job_api)
        except UserError as exc:
            for name, rec in self.run.stages.items():
                if rec["state"] in (st.PENDING, st.RUNNING):
                    self.run.set(name, state=st.FAILED, finished=self.clock(), message=str(exc))
            self.echo(f"error: {exc}")
            return False
        return True

    def _stop(self, why: str) -> None:
        self.api.delete_stages(self.ctx.namespace, self.run.run_id)
        for name, rec in self.run.stages.items():
            if rec["state"] in (st.PENDING, st.RUNNING):
                self.run.set(name, state=st.CANCELLED, finished=self.clock(), message=why)
        self.echo(why)

    def _ready(self, rec: dict[str, Any]) -> bool:
        return rec["state"] == st.PENDING and all(self.run.stages[d]["state"] == st.SUCCEEDED for d in rec["needs"])

    def _step(self) -> bool:
        """One pass: watch running stages, start ready ones. False when nothing can move."""
        for name in self.run.data["order"]:
            rec, stage = self.run.stages[name], self.pipeline.stages[name]
            if rec["state"] == st.RUNNING:
                self._watch(name, rec, stage)
            elif self._ready(rec):
                self._start(name, rec, stage, rec["attempts"] + 1)
        return any(r["state"] == st.RUNNING or self._ready(r) for r in self.run.stages.values())

    def _selector(self, name: str, attempt: int) -> str:
        return f"{LABEL_RUN}={self.run.run_id},{LABEL_STAGE}={name},{LABEL_ATTEMPT}={attempt}"

    def _start(self, name: str, rec: dict[str, Any], stage: Stage, attempt: int) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = stage_object(self.ctx, stage, rec["command"], attempt)
        except UserError as exc:
            self._fail(name, str(exc))
            return
        kind, obj_name = job_kind(stage, self.ctx), obj["metadata"]["name"]
        # Record the intent first: a driver killed right after `create` adopts the object by name.
        self.run.set(name, state=st.RUNNING, attempts=attempt, object=f"{obj['kind']}/{obj_name}",
                     started=self.clock(), finished=None, message="", deleting=False, created=False,
                     first_attempt=rec.get("first_attempt") or attempt)
        try:
            self.api.create(obj)
            self.run.set(name, stuck_since=None, created=True)
            self.echo(f"{name}: created {obj['kind']} {obj_name}")
        except QuotaExceeded as exc:
            self.run.set(name, state=st.PENDING, attempts=attempt - 1, object=None)
            self._stuck(name, rec, stage, f"refused by quota: {exc}", kind=None)
        except ApiException as exc:
            if exc.status == 404:
                self._fail(name, f"{obj['kind']} ({obj['apiVersion']}) is not served by this cluster: install it "
                                 "or choose another with resources.job_api / --job-api (docs/cluster.md)")
            elif exc.status == 409:
                self._adopt(name, kind, obj_name)
            elif 400 <= exc.status < 500:  # 429 and quota's 403 never get here (kubeapi retries or raises them)
                self.run.set(name, object=None)
                self._fail(name, f"{obj['kind']} {obj_name} refused by the API server: {refusal(exc)}")
            else:
                raise

    def _adopt(self, name: str, kind, obj_name: str) -> None:
        """409: the object exists. Adopt it only if it is this run's (an earlier driver made it)."""
        found = self.api.get(kind, self.ctx.namespace, obj_name)
        owner = ((found or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_RUN)
        if found is not None and owner != self.ctx.run_uri:
            self._fail(name, f"{found['kind']} {obj_name} already exists and belongs to {owner or 'something else'}, "
                             f"not to {self.ctx.run_uri}; delete it or use another run id")
            return
        self.run.set(name, created=found is not None)
        self.echo(f"{name}: adopted {kind.kind} {obj_name}")

    def _fail(self, name: str, why: str) -> None:
        self.run.set(name, state=st.FAILED, finished=self.clock(), message=why)
        self.echo(f"{name}: failed ({why})")

    def _stuck(self, name: str, rec: dict[str, Any], stage: Stage, reason: str, kind) -> None:
        """Record why a stage does not start; fail it (deleting its attempt) past its pending timeout."""
        now = self.clock()
        since = now if rec.get("stuck_since") is None else rec["stuck_since"]
        timeout = stage.resources.pending_timeout_s
        if now - since >= timeout:
            if kind is not None:
                self.api.delete(kind, self.ctx.namespace, object_name(self.run.run_id, name, str(rec["attempts"])))
            self._fail(name, f"stuck for {int(now - since)} s: {reason}")
            return
        message = f"waiting: {reason} (fails after {timeout} s)"
        if rec.get("message") != message or rec.get("stuck_since") != since:
            self.run.set(name, stuck_since=since, message=message)
            self.echo(f"{name}: {message}")

    def _watch(self, name: str, rec: dict[str, Any], stage: Stage) -> None:
        kind = job_kind(stage, self.ctx)
        attempt = rec["attempts"]
        obj_name = object_name(self.run.run_id, name, str(attempt))
        obj = self.api.get(kind, self.ctx.namespace, obj_name)
        if rec.get("deleting"):  # the failed attempt must be gone (pods included) before the next one
            if obj is None:
                self._start(name, rec, stage, attempt + 1)
            return
        if obj is None:
            if self.run.accept_done(name) or self.run.cancel_requested():  # (cancel deletes it: not a failure)
                return
            if rec.get("created"):  # ours, and gone without this driver deleting it
                self._attempt_failed(name, rec, stage, kind, obj_name,
                                     f"deleted by someone else: {kind.kind} {obj_name} is gone")
            else:  # recorded but never created: the driver died in between
                self._start(name, rec, stage, attempt)
            return
        if not rec.get("created"):  # created by a driver that died before recording it
            self.run.set(name, created=True)
        outcome, message = kind.outcome(obj)
        if outcome == "running" and kind.suspended(obj):
            queue = (obj["metadata"].get("labels") or {}).get(QUEUE_LABEL)
            message = f"waiting: suspended until admitted{f' (Kueue queue {queue})' if queue else ''}"
            if rec.get("message") != message:
                self.run.set(name, message=message, stuck_since=None)
            return
        if outcome == "running":
            pods = self.api.pods(self.ctx.namespace, self._selector(name, attempt))
            reason = stuck_reason(pods, lambda: self.api.warnings(self.ctx.namespace), obj_name)
            if reason:
                self._stuck(name, rec, stage, reason, kind)
            elif rec.get("stuck_since") is not None or (rec.get("message") or "").startswith("waiting: suspended"):
                self.run.set(name, stuck_since=None, message="")
            return
        self.run.set(name, finished=self.clock(), stuck_since=None)
        if outcome == "succeeded" and self.run.accept_done(name):
            self.echo(f"{name}: succeeded")
            return
        code = exit_code_of(message, self.api.pods(self.ctx.namespace, self._selector(name, attempt))) if outcome == "failed" else None
        why = message or "finished without writing _DONE.json"
        if code == EXIT_WAITING_FOR_LABELS:
            self.run.set(name, state=st.WAITING,
                         message=f"waiting for labels; label the exported batch, then `unsupft-ctl resume {self.run.run_id}`")
            self.echo(f"{name}: waiting for labels")
        elif code == EXIT_USER_ERROR:
            self._fail(name, f"bad input (exit 2), not retried; see `unsupft-ctl logs {self.run.run_id} {name}`")
        else:
            self._attempt_failed(name, rec, stage, kind, obj_name, why)

    def _attempt_failed(self, name: str, rec: dict[str, Any], stage: Stage, kind, obj_name: str, why: str) -> None:
        """A failed attempt: removed before the next one within `retries`, else the stage fails."""
        attempt = rec["attempts"]
        if attempt - (rec.get("first_attempt") or 1) < stage.resources.retries:
            self.api.delete(kind, self.ctx.namespace, obj_name)
            self.run.set(name, deleting=True, message=f"attempt {attempt} failed ({why}); removing it before attempt {attempt + 1}")
            self.echo(f"{name}: attempt {attempt} failed ({why}); retrying")
        else:
            self._fail(name, why)
