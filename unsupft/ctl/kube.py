"""The Kubernetes backend: stage objects and the submit/cancel helpers.

A stage asking for one process runs as a `batch/v1` Job; more processes (nodes x processes per
node) run as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1, as of Trainer
v2.3.0) or a training-operator v1 `PyTorchJob` (kubeflow.org/v1), whichever the cluster serves
(`kubeapi.Api.served`), or as the pipeline (`resources.job_api`) or the command line say. Their
pods call `unsupft launch` (torchrun that exits with the stage's own code: 2, 69, 75 reach the
pod; `unsupft.distributed.launch`) without rendezvous flags: the operator's `PET_*` environment configures it.

Every attempt is its own object named `<run>-<stage>-<attempt>`, owned (ownerReferences) by the
run's ConfigMap, so deleting that one object (`helm uninstall`, `unsupft-ctl cancel`) lets the
garbage collector remove everything the run started. Retries follow the cause: a pod evicted or
preempted (`DisruptionTarget`) is replaced without counting, exit 2 (bad input) and 75 (waiting for
labels) end the attempt at once, anything else gets one more pod before the driver
(`kubedriver.Driver`) decides about a new attempt.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from unsupft import store
from unsupft.ctl.command import stage_args
from unsupft.ctl.spec import Pipeline, Resources, Stage, own_variable
from unsupft.ctl.state import run_uri
from unsupft.errors import EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS, UserError

LABEL_RUN = "unsupft.io/run"
LABEL_STAGE = "unsupft.io/stage"
LABEL_ATTEMPT = "unsupft.io/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
ANNOTATION_RUN = "unsupft.io/run-uri"  # which run (store + id) an object belongs to: checked before adopting it
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TTL_SECONDS = 3 * 24 * 3600
UID = 1000
FAIL_AT_ONCE = [EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS]  # retrying cannot help these
RUNTIME_PATCH_MANAGER = "unsupft.io/ctl"
TRAINER_VERSION = "v2.3.0"  # the Kubeflow Trainer release whose API (and CRDs in tests/data) we target
# A multi-process stage's command: torchrun's options and PET_* environment, the stage's own exit
# code (`unsupft.distributed.launch`, where the operators' environment is cited).
LAUNCH = ["unsupft", "launch"]
# `unsupft-ctl drive` exits with this when another live driver holds the run's lease (sysexits.h
# EX_CANTCREAT: a second controller of the run cannot be made). The driver Job's podFailurePolicy
# fails the Job on it at once: a new pod would only find the same holder. Exit 69 keeps its meaning
# (the store unreachable after retries), which a new pod may well get past.
EXIT_DRIVER_HELD = 73
DRIVER_DEADLINE_S = 30 * 24 * 3600  # the driver Job's activeDeadlineSeconds: a whole run, stage after stage


def object_name(*parts: str) -> str:
    """A DNS-1035 name of at most 52 characters (room for the pod suffixes the controllers add)."""
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


def _resources(res: Resources) -> dict[str, Any]:
    requests = {"cpu": str(res.cpu), "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    if res.gpus:
        limits["nvidia.com/gpu"] = str(res.gpus)
    return {"requests": requests, "limits": limits}


@dataclass
class Context:
    """What every rendered object of one run shares.

    `owner` is the ownerReference to the run's ConfigMap (None when rendering offline);
    `job_api` is "trainjob" or "pytorchjob" for multi-process stages whose pipeline says "auto".
    """

    run_id: str
    namespace: str
    secret: str | None = None
    store_env: dict[str, str] = field(default_factory=dict)
    run_uri: str = ""
    owner: dict[str, Any] | None = None
    job_api: str = "trainjob"


def container_env(ctx: Context, res: Resources) -> list[dict[str, str]]:
    """Unbuffered logs, the store's non-secret settings, then the stage's own `env` (which wins),
    less unsupft's own variables: `validate` refuses them in a pipeline file, and a `Resources`
    built in code does not smuggle the checkpoint trust or stage options into a pod either."""
    allowed = {k: v for k, v in res.env.items() if not own_variable(k)}
    values = {"PYTHONUNBUFFERED": "1", **dict(sorted(ctx.store_env.items())), **allowed}
    return [{"name": k, "value": v} for k, v in values.items()]


def container(name: str, command: list[str], res: Resources, ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "image": res.image,
        "command": command,
        "env": container_env(ctx, res),
        "resources": _resources(res),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ctx.secret:  # credentials travel by reference only: the Secret's keys become env
        out["envFrom"] = [{"secretRef": {"name": ctx.secret}}]
    return out


def pod_spec(main: dict[str, Any], res: Resources, *, restart: str = "Never",
             service_account: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": restart,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [main],
        # Data-loader workers share tensors through /dev/shm; the default 64 MiB is too small.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    spec.update(placement(res, service_account))
    if "serviceAccountName" not in spec:
        spec["automountServiceAccountToken"] = False
    if res.priority_class:
        spec["priorityClassName"] = res.priority_class
    return spec


def placement(res: Resources, service_account: str | None = None) -> dict[str, Any]:
    """The pod fields every kind can set per stage (TrainJob through runtimePatches)."""
    out: dict[str, Any] = {}
    if service_account or res.service_account:
        out["serviceAccountName"] = service_account or res.service_account
    if res.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": s} for s in res.image_pull_secrets]
    if res.node_selector:
        out["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        out["tolerations"] = list(res.tolerations)
    return out


def pod_failure_policy(container_name: str, fail_at_once: list[int] = FAIL_AT_ONCE) -> dict[str, Any]:
    """Evictions and preemptions do not count; the exit codes retrying cannot help (a stage's bad
    input and waiting-for-labels; the driver's run held by another driver) end the Job at once."""
    return {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": container_name, "operator": "In", "values": list(fail_at_once)}},
    ]}


def pod_template(ctx: Context, stage: Stage, attempt: int, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": {**stage.resources.labels, **labels(ctx.run_id, stage.name, attempt)}}
    if stage.resources.annotations:
        meta["annotations"] = dict(stage.resources.annotations)
    return {"metadata": meta, "spec": spec}


def metadata(ctx: Context, name: str, object_labels: dict[str, str], queue: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ctx.namespace,
                            "labels": {**object_labels, **({QUEUE_LABEL: queue} if queue else {})}}
    if ctx.run_uri:
        meta["annotations"] = {ANNOTATION_RUN: ctx.run_uri}
    if ctx.owner:
        meta["ownerReferences"] = [dict(ctx.owner)]
    return meta


class JobKind:
    """How one stage attempt becomes a Kubernetes object and how its conditions read."""

    group: str
    version: str
    kind: str
    plural: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def render(self, ctx: Context, stage: Stage, args: list[str], name: str, attempt: int) -> dict[str, Any]:
        """One stage attempt as this kind's object: its spec, named and labelled (in its queue, if any)."""
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": metadata(ctx, name, labels(ctx.run_id, stage.name, attempt), stage.resources.queue),
                "spec": self.spec(ctx, stage, args, attempt)}

    def spec(self, ctx: Context, stage: Stage, args: list[str], attempt: int) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def outcome(obj: dict[str, Any]) -> tuple[str, str]:
        """(`running`|`succeeded`|`failed`, message) from the object's status conditions."""
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond.get("status") != "True":
                continue
            kind, reason, message = cond.get("type"), cond.get("reason", ""), cond.get("message", "")
            if kind in ("Complete", "Succeeded"):
                return "succeeded", message
            if kind == "Failed":
                return "failed", f"{reason}: {message}".strip(": ")
        return "running", ""

    @staticmethod
    def suspended(obj: dict[str, Any]) -> bool:
        """Held by a queue (Kueue suspends what it has not admitted yet): waiting, not stuck."""
        spec = obj.get("spec") or {}
        return bool(spec.get("suspend") or (spec.get("runPolicy") or {}).get("suspend"))


EXIT_CODE_RE = re.compile(r"exit code (\d+)")


def exit_code_of(message: str, pods: list[dict[str, Any]]) -> int | None:
    """The exit code that ended an attempt: from the Job's pod-failure-policy message, else from
    the last terminated container among its pods (PyTorchJob and TrainJob do not say it)."""
    found = EXIT_CODE_RE.search(message or "")
    if found:
        return int(found.group(1))
    codes = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if term and term.get("exitCode"):
                codes.append((term.get("finishedAt") or "", int(term["exitCode"])))
    return max(codes)[1] if codes else None


class BatchJob(JobKind):
    group, version, kind, plural = "batch", "v1", "Job", "jobs"

    def spec(self, ctx, stage, args, attempt):
        res = stage.resources
        main = container("unsupft", ["unsupft", *args], res, ctx)
        return {
            # One more pod after a crash; the driver adds whole new attempts.
            "backoffLimit": 1,
            "activeDeadlineSeconds": res.deadline_s,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "podFailurePolicy": pod_failure_policy("unsupft"),
            "template": pod_template(ctx, stage, attempt, pod_spec(main, res, restart="Never")),
        }


class PyTorchJob(JobKind):
    group, version, kind, plural = "kubeflow.org", "v1", "PyTorchJob", "pytorchjobs"

    def spec(self, ctx, stage, args, attempt):
        res = stage.resources
        command = [*LAUNCH, "--nproc-per-node", str(res.procs_per_node), *args]

        def replica(count: int) -> dict[str, Any]:
            main = container("pytorch", command, res, ctx)  # the operator requires this name
            # ExitCode: the operator restarts pods killed by a signal (exit >= 128: OOM, node loss)
            # and fails at once on a program's own error (1-127), e.g. exit 2 for bad input.
            return {"replicas": count, "restartPolicy": "ExitCode",
                    "template": pod_template(ctx, stage, attempt, pod_spec(main, res, restart="Never"))}

        replicas = {"Master": replica(1)}
        if res.nodes > 1:
            replicas["Worker"] = replica(res.nodes - 1)
        return {"nprocPerNode": str(res.procs_per_node),
                "runPolicy": {"backoffLimit": 1, "activeDeadlineSeconds": res.deadline_s,
                              "ttlSecondsAfterFinished": TTL_SECONDS, "cleanPodPolicy": "Running"},
                "pytorchReplicaSpecs": replicas}


class TrainJob(JobKind):
    """A Trainer v2 TrainJob on the chart's `TrainingRuntime` (image pull policy, /dev/shm, the
    security context and the store Secret live there); per-stage pod settings go in runtimePatches."""

    group, version, kind, plural = "trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs"

    def spec(self, ctx, stage, args, attempt):
        res = stage.resources
        if res.priority_class:
            raise UserError(f"stages.{stage.name}: priority_class cannot be set on a TrainJob (Trainer {TRAINER_VERSION} "
                            f"runtimePatches do not allow priorityClassName); set it in the TrainingRuntime "
                            f"{res.runtime!r} or use job_api: pytorchjob")
        node = {"name": "node", "template": {"spec": {"template": pod_template(ctx, stage, attempt, placement(res))}}}
        return {
            "runtimeRef": {"apiGroup": self.group, "kind": res.runtime_kind, "name": res.runtime},
            "activeDeadlineSeconds": res.deadline_s,
            "trainer": {"image": res.image, "command": [*LAUNCH, *args],
                        "env": container_env(ctx, res), "numNodes": res.nodes, "numProcPerNode": res.procs_per_node,
                        "resourcesPerNode": _resources(res)},
            "runtimePatches": [{"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {
                "template": {"spec": {"replicatedJobs": [node]}}}}],
        }


JOB_KINDS: dict[str, JobKind] = {"trainjob": TrainJob(), "pytorchjob": PyTorchJob()}
BATCH = BatchJob()


def job_kind(stage: Stage, ctx: Context) -> JobKind:
    if stage.resources.processes == 1:
        return BATCH
    chosen = stage.resources.job_api if stage.resources.job_api != "auto" else ctx.job_api
    return JOB_KINDS[chosen]


def stage_object(ctx: Context, stage: Stage, args: list[str], attempt: int) -> dict[str, Any]:
    return job_kind(stage, ctx).render(ctx, stage, args, object_name(ctx.run_id, stage.name, str(attempt)), attempt)


def run_configmap(ctx: Context, store_uri: str) -> dict[str, Any]:
    """The one object a CLI-submitted run's other objects belong to (no credentials in it)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": object_name(ctx.run_id, "run"), "namespace": ctx.namespace,
                         "labels": labels(ctx.run_id, component="run"),
                         "annotations": {ANNOTATION_RUN: ctx.run_uri}},
            "data": {"store": store_uri, "run": ctx.run_id}}


def owner_reference(configmap: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "name": configmap["metadata"]["name"],
            "uid": configmap["metadata"]["uid"]}


def default_queue(source: dict[str, Any]) -> str | None:
    """The run's default Kueue LocalQueue (`resources.defaults.queue` of the pipeline as written),
    which the driver Job goes into too: under Kueue's `manageJobsWithoutQueueName: true` a Job
    without the queue label is suspended for ever, so a run whose stages name a queue would never start."""
    return (((source or {}).get("resources") or {}).get("defaults") or {}).get("queue")


def driver_job(ctx: Context, store_uri: str, image: str, *, service_account: str = "unsupft-driver",
               generation: int = 0, deadline_s: int = DRIVER_DEADLINE_S, queue: str | None = None) -> dict[str, Any]:
    """The small Job that runs `unsupft-ctl drive RUN` next to the stages (`generation` counts resumes).

    It exits 0 whenever the run reaches a final state, so `backoffLimit` only covers crashes and an
    API server that stayed unreachable through the driver's own retries; `activeDeadlineSeconds`
    bounds a driver that never gets there; `queue` (the run's default, `default_queue`) labels it
    for Kueue. Its podFailurePolicy (hence restartPolicy Never) fails
    the Job at once when another driver holds the run (`EXIT_DRIVER_HELD`) and does not count a
    driver pod evicted from a drained node.
    """
    res = Resources(image=image, cpu="100m", memory="256Mi")
    suffix = ("driver",) if not generation else ("driver", str(generation))
    main = container("driver", ["unsupft-ctl", "--store", store_uri, "drive", ctx.run_id], res, ctx)
    main["resources"]["limits"]["memory"] = "512Mi"
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": metadata(ctx, object_name(ctx.run_id, *suffix), labels(ctx.run_id, component="driver"), queue),
            "spec": {"backoffLimit": 6, "activeDeadlineSeconds": deadline_s, "ttlSecondsAfterFinished": TTL_SECONDS,
                     "podFailurePolicy": pod_failure_policy("driver", [EXIT_DRIVER_HELD]),
                     "template": {"metadata": {"labels": labels(ctx.run_id, component="driver")},
                                  "spec": pod_spec(main, res, restart="Never", service_account=service_account)}}}


def render(pipeline: Pipeline, ctx: Context, image: str) -> list[dict[str, Any]]:
    """Every object a submit creates: the run's ConfigMap, the driver Job, then each stage's first attempt."""
    run = run_uri(pipeline.store, ctx.run_id)
    ctx.run_uri = ctx.run_uri or run
    return [run_configmap(ctx, pipeline.store), driver_job(ctx, pipeline.store, image, queue=default_queue(pipeline.source))] + [
        stage_object(ctx, s, stage_args(s, run), 1) for s in pipeline.stages.values()]


def store_env() -> dict[str, str]:
    """Non-secret store settings forwarded to pods (the endpoint of an S3-compatible server)."""
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def check_store_for_cluster(pipeline: Pipeline) -> None:
    if not store.is_s3(pipeline.store):
        raise UserError(f"store {pipeline.store}: the kubernetes backend needs an s3:// store that pods can reach")
    for name, uri in pipeline.datasets.items():
        if not store.is_s3(uri):
            raise UserError(f"datasets.{name}: {uri} is a local path; pods on the cluster cannot read it (use s3://)")
