"""The Kubernetes backend: stage objects, the in-cluster driver, and the submit/cancel helpers.

A stage asking for one process runs as a `batch/v1` Job; more processes (nodes x processes per
node) run as a Kubeflow `kubeflow.org/v1` PyTorchJob whose pods call `torchrun` without rendezvous
flags (the training operator's `PET_*` environment configures it). Both sit behind `JobKind`, so a
newer kind (Kubeflow TrainJob) is one more class.

The driver (`unsupft-ctl drive RUN`, itself a Job) walks the DAG: it creates each stage's object
once its inputs succeeded, polls its conditions, re-creates it (next attempt) within the retry
budget, and records every transition in run.json in the store. Object names are deterministic
(`<run>-<stage>-<attempt>`), so a restarted driver finds and adopts what its predecessor created
instead of starting a stage twice.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

from unsupft import store
from unsupft.ctl import state as st
from unsupft.ctl.spec import Pipeline, Resources, Stage
from unsupft.errors import EXIT_WAITING_FOR_LABELS, UserError

LABEL_RUN = "unsupft.io/run"
LABEL_STAGE = "unsupft.io/stage"
LABEL_ATTEMPT = "unsupft.io/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
TTL_SECONDS = 3 * 24 * 3600
POLL_S = 10.0
UID = 1000


def object_name(*parts: str) -> str:
    """A DNS-1123 name of at most 52 characters (room for the pod suffixes the controllers add)."""
    name = "-".join(parts)
    if len(name) <= 52:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:43].rstrip('-')}-{digest}"


def labels(run_id: str, stage: str | None = None, attempt: int | None = None, component: str = "stage") -> dict[str, str]:
    out = {"app.kubernetes.io/name": "unsupft", "app.kubernetes.io/managed-by": "unsupft-ctl",
           LABEL_COMPONENT: component, LABEL_RUN: run_id}
    if stage is not None:
        out[LABEL_STAGE] = stage
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False}


def _resources(res: Resources) -> dict[str, Any]:
    requests = {"cpu": str(res.cpu), "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpus:
        limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": requests, "limits": limits}


def _env_from(secret: str | None) -> list[dict[str, Any]]:
    # Credentials travel by reference only: the Secret's keys (AWS_ACCESS_KEY_ID, ...) become env.
    return [{"secretRef": {"name": secret}}] if secret else []


def pod_spec(container: dict[str, Any], res: Resources, *, restart: str, service_account: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": restart,
        "securityContext": pod_security(),
        "containers": [container],
        # Data-loader workers share tensors through /dev/shm; the default 64 MiB is too small.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    else:
        spec["automountServiceAccountToken"] = False
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = list(res.tolerations)
    return spec


def _container(name: str, command: list[str], res: Resources, secret: str | None, store_env: dict[str, str]) -> dict[str, Any]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}] + [{"name": k, "value": v} for k, v in sorted(store_env.items())]
    container = {
        "name": name,
        "image": res.image,
        "command": command,
        "env": env,
        "resources": _resources(res),
        "securityContext": container_security(),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if secret:
        container["envFrom"] = _env_from(secret)
    return container


class JobKind:
    """How one stage attempt becomes a Kubernetes object and how its conditions read."""

    api_version: str
    kind: str
    plural: str

    def render(self, ctx: "Context", stage: Stage, args: list[str], name: str, attempt: int) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def outcome(obj: dict[str, Any]) -> tuple[str, str]:
        """(`running`|`succeeded`|`failed`|`waiting`, message) from the object's status."""
        conditions = (obj.get("status") or {}).get("conditions") or []
        for cond in conditions:
            if cond.get("status") != "True":
                continue
            kind, reason, message = cond.get("type"), cond.get("reason", ""), cond.get("message", "")
            if kind in ("Complete", "Succeeded"):
                return "succeeded", message
            if kind == "Failed":
                if reason == "PodFailurePolicy" and str(EXIT_WAITING_FOR_LABELS) in message:
                    return "waiting", message
                return "failed", f"{reason}: {message}".strip(": ")
        return "running", ""


class BatchJob(JobKind):
    api_version, kind, plural = "batch/v1", "Job", "jobs"

    def render(self, ctx, stage, args, name, attempt):
        res = stage.resources
        waits_for_people = stage.kind == "label"
        container = _container("unsupft", ["unsupft", *args], res, ctx.secret, ctx.store_env)
        spec: dict[str, Any] = {
            # One in-place restart for a crashed container; the driver adds whole new attempts.
            "backoffLimit": 1,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {"metadata": {"labels": labels(ctx.run_id, stage.name, attempt)},
                         "spec": pod_spec(container, res, restart="Never" if waits_for_people else "OnFailure")},
        }
        if waits_for_people:
            # The label stage exits 75 when it waits for a person: fail the Job at once with a
            # reason the driver reads as waiting-for-labels (needs restartPolicy Never).
            spec["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": "unsupft", "operator": "In", "values": [EXIT_WAITING_FOR_LABELS]}}]}
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": {"name": name, "namespace": ctx.namespace, "labels": labels(ctx.run_id, stage.name, attempt)},
                "spec": spec}


class PyTorchJob(JobKind):
    api_version, kind, plural = "kubeflow.org/v1", "PyTorchJob", "pytorchjobs"

    def render(self, ctx, stage, args, name, attempt):
        res = stage.resources
        command = ["torchrun", "--nproc-per-node", str(res.procs_per_node), "-m", "unsupft", *args]

        def replica(count: int) -> dict[str, Any]:
            container = _container("pytorch", command, res, ctx.secret, ctx.store_env)  # the operator requires this name
            return {"replicas": count, "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": labels(ctx.run_id, stage.name, attempt)},
                                 "spec": pod_spec(container, res, restart="OnFailure")}}

        replicas = {"Master": replica(1)}
        if res.nodes > 1:
            replicas["Worker"] = replica(res.nodes - 1)
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": {"name": name, "namespace": ctx.namespace, "labels": labels(ctx.run_id, stage.name, attempt)},
                "spec": {"nprocPerNode": str(res.procs_per_node),
                         "runPolicy": {"backoffLimit": 1, "ttlSecondsAfterFinished": TTL_SECONDS, "cleanPodPolicy": "None"},
                         "pytorchReplicaSpecs": replicas}}


def job_kind(stage: Stage) -> JobKind:
    return PyTorchJob() if stage.resources.processes > 1 else BatchJob()


class Context:
    """What every rendered object shares: run id, namespace, the store Secret and endpoint."""

    def __init__(self, run_id: str, namespace: str, secret: str | None, store_env: dict[str, str] | None = None,
                 service_account: str = "unsupft-driver", image: str | None = None) -> None:
        self.run_id, self.namespace, self.secret = run_id, namespace, secret
        self.store_env = store_env or {}
        self.service_account, self.image = service_account, image


def stage_object(ctx: Context, stage: Stage, args: list[str], attempt: int) -> dict[str, Any]:
    return job_kind(stage).render(ctx, stage, args, object_name(ctx.run_id, stage.name, str(attempt)), attempt)


def driver_job(ctx: Context, store_uri: str, image: str) -> dict[str, Any]:
    """The small Job that runs `unsupft-ctl drive RUN` next to the stages."""
    res = Resources(image=image, cpu="100m", memory="256Mi")
    container = _container("driver", ["unsupft-ctl", "--store", store_uri, "drive", ctx.run_id], res, ctx.secret, ctx.store_env)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": object_name(ctx.run_id, "driver"), "namespace": ctx.namespace,
                         "labels": labels(ctx.run_id, component="driver")},
            "spec": {"backoffLimit": 6, "ttlSecondsAfterFinished": TTL_SECONDS,
                     "template": {"metadata": {"labels": labels(ctx.run_id, component="driver")},
                                  "spec": pod_spec(container, res, restart="OnFailure", service_account=ctx.service_account)}}}


def render(pipeline: Pipeline, ctx: Context, image: str) -> list[dict[str, Any]]:
    """Every object a submit creates: the driver Job, then the first attempt of each stage."""
    from unsupft.ctl.command import stage_args

    run = st.run_uri(pipeline.store, ctx.run_id)
    return [driver_job(ctx, pipeline.store, image)] + [
        stage_object(ctx, s, stage_args(s, run), 1) for s in pipeline.stages.values()]


# --------------------------------------------------------------------------- API access ---


class Api:
    """The few calls the driver makes, over the official client (BatchV1Api, CustomObjectsApi)."""

    def __init__(self, api_client=None) -> None:
        from kubernetes import client

        if api_client is None:
            api_client = load_client()
        self.client = api_client
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def create(self, obj: dict[str, Any]) -> None:
        ns = obj["metadata"]["namespace"]
        if obj["kind"] == "Job":
            self.batch.create_namespaced_job(ns, obj)
        else:
            group, version = obj["apiVersion"].split("/")
            self.custom.create_namespaced_custom_object(group, version, ns, PyTorchJob.plural, obj)

    def get(self, kind: JobKind, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            if isinstance(kind, BatchJob):
                raw = self.batch.read_namespaced_job(name, namespace, _preload_content=False)
                import json

                return json.loads(raw.data)
            group, version = kind.api_version.split("/")
            return self.custom.get_namespaced_custom_object(group, version, namespace, kind.plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete_run(self, namespace: str, run_id: str, *, include_driver: bool) -> None:
        selector = f"{LABEL_RUN}={run_id}"
        if not include_driver:
            selector += f",{LABEL_COMPONENT}=stage"
        for job in self.batch.list_namespaced_job(namespace, label_selector=selector).items:
            self.batch.delete_namespaced_job(job.metadata.name, namespace, propagation_policy="Background")
        listed = self.custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", label_selector=selector)
        for item in listed.get("items", []):
            self.custom.delete_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs",
                                                        item["metadata"]["name"])

    def stage_logs(self, namespace: str, run_id: str, stage: str) -> str:
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{LABEL_RUN}={run_id},{LABEL_STAGE}={stage}").items
        if not pods:
            raise UserError(f"no pods for stage {stage} of run {run_id} in namespace {namespace} (finished objects expire after {TTL_SECONDS // 3600} h)")
        pods.sort(key=lambda p: p.metadata.creation_timestamp)
        pod = pods[-1]
        container = pod.spec.containers[0].name
        return self.core.read_namespaced_pod_log(pod.metadata.name, namespace, container=container)


def load_client():
    """In-cluster config inside a pod, else the user's kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise UserError(f"no Kubernetes access: neither in-cluster config nor a kubeconfig ({exc})") from None
    return client.ApiClient()


# ------------------------------------------------------------------------------ driver ---


class Driver:
    """Walks one run's DAG on the cluster; every decision is recorded in run.json first."""

    def __init__(self, run: st.Run, pipeline: Pipeline, api: Api, ctx: Context, *,
                 poll_s: float = POLL_S, echo: Callable[[str], None] = print) -> None:
        self.run, self.pipeline, self.api, self.ctx = run, pipeline, api, ctx
        self.poll_s, self.echo = poll_s, echo

    def execute(self) -> bool:
        for name in self.run.stages:
            if self.run.is_cached(name):
                self.run.set(name, state=st.SUCCEEDED)
        while True:
            if self.run.cancel_requested():
                self.api.delete_run(self.ctx.namespace, self.run.run_id, include_driver=False)
                for name, rec in self.run.stages.items():
                    if rec["state"] in (st.PENDING, st.RUNNING):
                        self.run.set(name, state=st.CANCELLED, finished=time.time(), message="cancelled")
                self.echo("cancelled")
                return False
            active = self._step()
            if not active:
                return all(r["state"] == st.SUCCEEDED for r in self.run.stages.values())
            time.sleep(self.poll_s)

    def _step(self) -> bool:
        """One pass: watch running stages, start ready ones. False when nothing can move."""
        recs, moving = self.run.stages, False
        for name in self.run.data["order"]:
            rec, stage = recs[name], self.pipeline.stages[name]
            if rec["state"] == st.RUNNING:
                self._watch(name, rec, stage)
                moving = moving or rec["state"] in (st.RUNNING, st.PENDING)
            elif rec["state"] == st.PENDING and all(recs[d]["state"] == st.SUCCEEDED for d in rec["needs"]):
                self._start(name, rec, stage, rec["attempts"] + 1)
                moving = True
        return moving

    def _start(self, name: str, rec: dict[str, Any], stage: Stage, attempt: int) -> None:
        from kubernetes.client.exceptions import ApiException

        obj = stage_object(self.ctx, stage, rec["command"], attempt)
        # Record the intent first: a driver killed right after `create` adopts the object by name.
        self.run.set(name, state=st.RUNNING, attempts=attempt, object=f"{obj['kind']}/{obj['metadata']['name']}",
                     started=time.time(), finished=None, message="")
        try:
            self.api.create(obj)
            self.echo(f"{name}: created {obj['kind']} {obj['metadata']['name']}")
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists already (an earlier driver created it): adopt it
                raise
            self.echo(f"{name}: adopted {obj['kind']} {obj['metadata']['name']}")

    def _watch(self, name: str, rec: dict[str, Any], stage: Stage) -> None:
        kind = job_kind(stage)
        obj_name = object_name(self.ctx.run_id, name, str(rec["attempts"]))
        obj = self.api.get(kind, self.ctx.namespace, obj_name)
        if obj is None:  # recorded but never created (driver died in between) or deleted by someone
            if not self.run.accept_done(name):
                self._start(name, rec, stage, rec["attempts"])
            return
        outcome, message = kind.outcome(obj)
        if outcome == "running":
            return
        self.run.set(name, finished=time.time())
        if outcome == "succeeded" and self.run.accept_done(name):
            self.echo(f"{name}: succeeded")
        elif outcome == "waiting":
            self.run.set(name, state=st.WAITING, message="waiting for labels; label the exported batch, then resubmit")
            self.echo(f"{name}: waiting for labels")
        else:
            why = message or "finished without writing _DONE.json"
            if rec["attempts"] <= stage.resources.retries:
                self.echo(f"{name}: attempt {rec['attempts']} failed ({why}); retrying")
                self._start(name, rec, stage, rec["attempts"] + 1)
            else:
                self.run.set(name, state=st.FAILED, message=why)
                self.echo(f"{name}: failed ({why})")


def store_env() -> dict[str, str]:
    """Non-secret store settings forwarded to pods (the endpoint of an S3-compatible server)."""
    import os

    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def check_store_for_cluster(pipeline: Pipeline) -> None:
    if not store.is_s3(pipeline.store):
        raise UserError(f"store {pipeline.store}: the kubernetes backend needs an s3:// store that pods can reach")
    for name, uri in pipeline.datasets.items():
        if not store.is_s3(uri):
            raise UserError(f"datasets.{name}: {uri} is a local path; pods on the cluster cannot read it (use s3://)")
