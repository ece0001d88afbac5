"""The few Kubernetes API calls unsupft makes, through the official client, made to survive a real
API server: 429 (with its Retry-After), 5xx and dropped connections are retried with capped
exponential backoff and full jitter, a bounded number of times; a 403 "exceeded quota" is its own
exception (`QuotaExceeded`) because it means *wait*, not *fail*; a 404 on a whole API group means
the CRD is not installed (`Api.served`). Every other 4xx reaches the caller as the client's
`ApiException`, whose Status `refusal` words as the API server did (the driver fails the stage on it).

Jobs, PyTorchJobs and TrainJobs all go through `CustomObjectsApi` (its paths are the generic
`/apis/<group>/<version>/namespaces/<ns>/<plural>`, batch/v1 included), so every kind is a dict.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, TypeVar

from unsupft.ctl.kube import (BATCH, JOB_KINDS, LABEL_COMPONENT, LABEL_RUN, LABEL_STAGE, TRAINER_VERSION,
                              TTL_SECONDS, JobKind)
from unsupft.errors import UserError

RETRIABLE_STATUS = (429, 500, 502, 503, 504)
KINDS = (BATCH, *JOB_KINDS.values())  # every kind a stage attempt (or the driver, a batch Job) can be
T = TypeVar("T")


class ApiUnavailable(RuntimeError):
    """The API server kept failing through every retry (an infrastructure failure, not the user's)."""


class QuotaExceeded(Exception):
    """A ResourceQuota refused the object; the message is the API server's."""


def _status_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        return json.loads(body).get("message", "") if body else str(exc)
    except (ValueError, AttributeError):
        return str(body)


def refusal(exc: Exception) -> str:
    """An API error as the API server words it: `422 Invalid: <the Status object's message>`
    (a webhook's denial, RBAC's Forbidden, a validation error), for `status` and the driver's log."""
    body = getattr(exc, "body", None)
    try:
        reason = json.loads(body).get("reason") if body else None
    except (ValueError, AttributeError):
        reason = None
    return f"{getattr(exc, 'status', '')} {reason or getattr(exc, 'reason', '')}: {_status_message(exc)}".strip()


class Api:
    def __init__(self, api_client=None, *, retries: int = 8, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        from kubernetes import client

        self.client = api_client if api_client is not None else load_client()
        self.custom = client.CustomObjectsApi(self.client)
        self.core = client.CoreV1Api(self.client)
        self.retries, self.backoff_s, self.max_backoff_s, self.sleep = retries, backoff_s, max_backoff_s, sleep
        self.retried = 0  # calls that needed a retry (for tests and logs)

    # ------------------------------------------------------------------------- retrying ---
    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == 403 and "exceeded quota" in _status_message(exc):
                    raise QuotaExceeded(_status_message(exc)) from None
                if exc.status not in RETRIABLE_STATUS:
                    raise
                if attempt == self.retries:
                    raise ApiUnavailable(f"Kubernetes API: {exc.status} {exc.reason} "
                                         f"after {attempt + 1} tries") from None
                retry_after = (exc.headers or {}).get("Retry-After")
                delay = float(retry_after) if retry_after and retry_after.isdigit() else self._backoff(attempt)
            except (HTTPError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise ApiUnavailable(f"Kubernetes API unreachable after {attempt + 1} tries: {exc}") from None
                delay = self._backoff(attempt)
            self.retried += 1
            self.sleep(min(delay, self.max_backoff_s))
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int) -> float:
        # Full jitter: many drivers hitting one recovering API server do not retry in lockstep.
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    def _raw(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A core-API call answered as plain JSON (the typed models are not needed here)."""
        return json.loads(self._call(fn, *args, _preload_content=False, **kwargs).data)

    @staticmethod
    def _unless_missing(call: Callable[[], T]) -> T | None:
        """`call()`, or None when the API server answers 404 (no such object, or no such CRD)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # ------------------------------------------------------------------------ discovery ---
    def served(self, kind: JobKind) -> bool:
        """Does the cluster serve this kind (its CRD installed)? Discovery, as kubectl does it."""
        found = self._unless_missing(lambda: self._raw(self.custom.get_api_resources, kind.group, kind.version))
        return any(r.get("name") == kind.plural for r in (found or {}).get("resources", []))

    def choose_job_api(self) -> str:
        """"trainjob" when Kubeflow Trainer v2 is installed, else "pytorchjob", else a one-line error."""
        for name, kind in JOB_KINDS.items():
            if self.served(kind):
                return name
        raise UserError(f"this cluster serves neither TrainJob ({JOB_KINDS['trainjob'].api_version}, Kubeflow Trainer "
                        f"{TRAINER_VERSION}) nor PyTorchJob ({JOB_KINDS['pytorchjob'].api_version}, training-operator v1); "
                        "install one for multi-process stages (docs/cluster.md)")

    # -------------------------------------------------------------------------- objects ---
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"]["namespace"]
        if obj["kind"] == "ConfigMap":
            return self._raw(self.core.create_namespaced_config_map, ns, obj)
        kind = next(k for k in KINDS if k.kind == obj["kind"])
        return self._call(self.custom.create_namespaced_custom_object, kind.group, kind.version, ns,
                          kind.plural, obj)

    def get(self, kind: JobKind, namespace: str, name: str) -> dict[str, Any] | None:
        return self._unless_missing(lambda: self._call(self.custom.get_namespaced_custom_object, kind.group,
                                                       kind.version, namespace, kind.plural, name))

    def delete(self, kind: JobKind, namespace: str, name: str) -> None:
        """Delete an attempt and, before it goes, its pods (foreground): a next attempt never
        shares GPUs or the rendezvous with the previous one's leftovers."""
        self._unless_missing(lambda: self._call(self.custom.delete_namespaced_custom_object, kind.group, kind.version,
                                                namespace, kind.plural, name, propagation_policy="Foreground"))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self._raw(self.core.list_namespaced_pod, namespace, label_selector=selector).get("items", [])

    def warnings(self, namespace: str) -> list[dict[str, Any]]:
        return self._raw(self.core.list_namespaced_event, namespace, field_selector="type=Warning").get("items", [])

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._unless_missing(lambda: self._raw(self.core.read_namespaced_config_map, name, namespace))

    def delete_configmap(self, namespace: str, name: str) -> None:
        # background: the garbage collector removes what the ConfigMap owns
        self._unless_missing(lambda: self._call(self.core.delete_namespaced_config_map, name, namespace,
                                                propagation_policy="Background"))

    def service_account_exists(self, namespace: str, name: str) -> bool:
        found = self._unless_missing(lambda: self._raw(self.core.read_namespaced_service_account, name, namespace))
        return found is not None

    def delete_stages(self, namespace: str, run_id: str) -> None:
        """Delete every stage object of the run (every kind the cluster serves); the driver stays."""
        selector = f"{LABEL_RUN}={run_id},{LABEL_COMPONENT}=stage"
        for kind in KINDS:
            listed = self._unless_missing(lambda: self._call(
                self.custom.list_namespaced_custom_object, kind.group, kind.version, namespace, kind.plural,
                label_selector=selector))
            for item in (listed or {}).get("items", []):
                self.delete(kind, namespace, item["metadata"]["name"])

    def stage_logs(self, namespace: str, run_id: str, stage: str) -> str:
        pods = self.pods(namespace, f"{LABEL_RUN}={run_id},{LABEL_STAGE}={stage}")
        if not pods:
            raise UserError(f"no pods for stage {stage} of run {run_id} in namespace {namespace} (finished objects expire after {TTL_SECONDS // 3600} h)")
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        pod = pods[-1]
        return self._call(self.core.read_namespaced_pod_log, pod["metadata"]["name"], namespace,
                          container=pod["spec"]["containers"][0]["name"])


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
