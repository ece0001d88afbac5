"""An HTTP emulator of the Kubernetes API the driver talks to, failures included.

It speaks real HTTP/JSON to the official `kubernetes` client, as an API server with these parts:

- objects: batch/v1 Jobs, kubeflow.org/v1 PyTorchJobs, trainer.kubeflow.org/v1alpha1 TrainJobs,
  core Pods, Events, ConfigMaps, ServiceAccounts; create (201, 409 on a taken name; uid and
  creationTimestamp assigned, `status` dropped as a status subresource does), get (404), list by
  label selector (`k=v`, `k!=v`) and field selector (`type=Warning`), delete;
- discovery (`/apis/<group>/<version>`), and a 404 for every path of a group whose CRD is not
  installed (`installed=`);
- garbage collection through ownerReferences (an object whose owner is gone is deleted, in
  cascade) and foreground deletion (the object stays, with a deletionTimestamp and the
  `foregroundDeletion` finalizer, until its dependents are gone: one more read);
- the controllers, played on each read of a stage object from `script[name] = (outcome, reads)`:
  pods (labelled from the object's pod template, owned by it) go Pending -> Running -> the
  outcome after `reads` reads. Outcomes: "succeed" (`on_success(obj)` plays the container, e.g.
  writes `_DONE.json`), "fail" (exit 1, the Job's backoff limit reached), "exit:N" (exit N; a Job
  whose pod failure policy names N fails with reason PodFailurePolicy, as the Job controller
  words it), "imagepull" (ErrImagePull/ImagePullBackOff forever), "unschedulable" (PodScheduled
  False, Unschedulable, forever), "quota-pods" (no pod; a FailedCreate Warning event "exceeded
  quota"), "evict" (the first pod is evicted with a DisruptionTarget condition and replaced, then
  success), "queued" (suspended, as Kueue holds what it has not admitted, until `reads`, then success);
- faults on the wire: `fail_next(method, path_part, status, times)` answers 429 (with
  Retry-After: 0), 5xx, 403 "exceeded quota", or "reset" (the connection closed without an answer);
- refusals of a create, in the API server's order (authorization, then admission, then storage's
  409), each answered with the Status object upstream builds:
  `forbid(verb, plural)`: RBAC grants the caller no `verb` on `plural`: 403 Forbidden, as
  k8s.io/apiserver pkg/endpoints/handlers/responsewriters/errors.go `Forbidden`/`forbiddenMessage`
  words it through k8s.io/apimachinery pkg/api/errors/errors.go `NewForbidden` (a create names no
  object: `<resource>.<group> is forbidden: User "..." cannot create resource ...`);
  `deny(plural, webhook, code, reason, message)`: a validating webhook answers allowed: false
  with that result Status; the API server rewrites it as
  k8s.io/apiserver pkg/admission/plugin/webhook/errors/statuserror.go `ToStatusErr` does (code
  403 and reason Forbidden when the webhook gave none; message `<resource>.<group> "<name>" is
  forbidden: admission webhook "<webhook>" denied the request: <message>`; details group, kind
  (the resource, as upstream) and name).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

GROUPS = {"batch/v1": ["jobs"], "kubeflow.org/v1": ["pytorchjobs"], "trainer.kubeflow.org/v1alpha1": ["trainjobs"]}
CORE = ("pods", "events", "configmaps", "serviceaccounts")
STAGE_KINDS = ("jobs", "pytorchjobs", "trainjobs")
GROUP_OF = {plural: gv.split("/")[0] for gv, plurals in GROUPS.items() for plural in plurals} | {p: "" for p in CORE}
USER = "system:serviceaccount:ml:unsupft-driver"  # who the driver's requests come from
QUOTA_MESSAGE = 'exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8'


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=")
            if labels.get(key) == value:
                return False
        else:
            key, value = term.split("=")
            if labels.get(key) != value:
                return False
    return True


def _field(obj: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        obj = (obj or {}).get(part)
    return obj


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    """Where each kind keeps the pod template the emulated controller copies labels from."""
    spec = obj["spec"]
    if obj["kind"] == "Job":
        return spec["template"]
    if obj["kind"] == "PyTorchJob":
        return spec["pytorchReplicaSpecs"]["Master"]["template"]
    return spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


class Emulator:
    def __init__(self, on_success: Callable[[dict], None] = lambda obj: None,
                 installed: tuple[str, ...] = tuple(GROUPS)) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> obj
        self.script: dict[str, tuple[str, int]] = {}
        self.reads: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []  # (verb, name) of creates and deletes
        self.faults: list[dict[str, Any]] = []
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural) RBAC does not grant
        self.webhooks: dict[str, tuple[str, dict[str, Any]]] = {}  # plural -> (webhook, its result Status)
        self.installed = set(installed)
        self.on_success = on_success
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Emulator":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------- helpers ---
    def fail_next(self, method: str, path_part: str, status: int | str, times: int = 1) -> None:
        self.faults.append({"method": method, "path": path_part, "status": status, "times": times})

    def forbid(self, verb: str, plural: str) -> None:
        self.forbidden.add((verb, plural))

    def deny(self, plural: str, webhook: str, code: int = 0, reason: str = "", message: str = "") -> None:
        """Every create of `plural` is denied by `webhook` with this result Status, until removed."""
        self.webhooks[plural] = (webhook, {"code": code, "reason": reason, "message": message})

    def add(self, plural: str, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            meta = obj.setdefault("metadata", {})
            meta.update(namespace=namespace, uid=meta.get("uid") or str(uuid.uuid4()),
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.objects[(plural, namespace, meta["name"])] = obj
            return obj

    def stage_objects(self) -> list[str]:
        return sorted(n for (p, _, n) in self.objects if p in STAGE_KINDS)

    def remaining(self, run_id: str) -> list[str]:
        """Everything labelled with this run still in the API (pods included)."""
        return sorted(f"{p}/{n}" for (p, _, n), o in self.objects.items()
                      if (o["metadata"].get("labels") or {}).get("unsupft.io/run") == run_id)

    def refusal(self, verb: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The Status the API server answers a request with before storing anything, or None."""
        group = GROUP_OF[plural]
        resource = f"{plural}.{group}" if group else plural  # schema.GroupResource.String()
        if (verb, plural) in self.forbidden:  # authorization runs before admission
            because = f'User "{USER}" cannot {verb} resource "{plural}" in API group "{group}" in the namespace "{namespace}"'
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": f"{resource} is forbidden: {because}", "reason": "Forbidden",
                    "details": {"group": group, "kind": plural}, "code": 403}
        if verb != "create" or plural not in self.webhooks:
            return None
        webhook, result = self.webhooks[plural]
        denied_by = f'admission webhook "{webhook}" denied the request'
        if result["message"]:
            message = f"{denied_by}: {result['message']}"
        elif result["reason"]:
            message = f"{denied_by}: {result['reason']}"
        else:
            message = f"{denied_by} without explanation"
        code = result["code"] or 403
        prefix = "Internal error occurred" if code == 500 else f'{resource} "{name or "Unknown"}" is forbidden'
        details = ({"causes": [{"message": message}]} if code == 500
                   else {"name": name or "Unknown", "group": group, "kind": plural})
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": f"{prefix}: {message}",
                "reason": result["reason"] or ("InternalError" if code == 500 else "Forbidden"), "details": details, "code": code}

    def _pods(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        uid = owner["metadata"]["uid"]
        return [o for (p, _, _), o in self.objects.items() if p == "pods"
                and any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]

    def _new_pod(self, obj: dict[str, Any], index: int, status: dict[str, Any]) -> dict[str, Any]:
        template = pod_template(obj)
        name = f"{obj['metadata']['name']}-{index}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": dict(template.get("metadata", {}).get("labels", {})),
                            "ownerReferences": [{"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                                                 "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]}]},
               "spec": {"containers": [{"name": "main", "image": "x"}]}, "status": status}
        return self.add("pods", obj["metadata"]["namespace"], pod)

    def _event(self, obj: dict[str, Any], reason: str, message: str) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        self.add("events", ns, {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}"},
                                "type": "Warning", "reason": reason, "message": message,
                                "involvedObject": {"kind": obj["kind"], "name": name, "namespace": ns},
                                "lastTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    # ---------------------------------------------------------------------- controllers ---
    def _created(self, obj: dict[str, Any]) -> None:
        """What the controllers do right after a stage object appears."""
        outcome, _ = self.script.get(obj["metadata"]["name"], ("succeed", 1))
        if outcome == "queued":  # Kueue's webhook suspends it until the queue admits it
            (obj["spec"]["runPolicy"] if obj["kind"] == "PyTorchJob" else obj["spec"])["suspend"] = True
        elif outcome == "quota-pods":
            self._event(obj, "FailedCreate", f'Error creating: pods "{obj["metadata"]["name"]}-0" is forbidden: {QUOTA_MESSAGE}')
        elif outcome == "imagepull":
            self._new_pod(obj, 0, {"phase": "Pending", "containerStatuses": [{"name": "main", "ready": False, "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.example/unsupft:typo"'}}}]})
        elif outcome == "unschedulable":
            self._new_pod(obj, 0, {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                   "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]})
        else:
            self._new_pod(obj, 0, {"phase": "Running"})

    def _advance(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        outcome, after = self.script.get(name, ("succeed", 1))
        self.reads[name] = self.reads.get(name, 0) + 1
        if (obj.get("status") or {}).get("conditions") or outcome in ("imagepull", "unschedulable", "quota-pods"):
            return
        if outcome == "queued":
            if self.reads[name] >= after:  # admitted: unsuspended, its pod starts, then it succeeds
                (obj["spec"]["runPolicy"] if obj["kind"] == "PyTorchJob" else obj["spec"])["suspend"] = False
                self.script[name] = ("succeed", after + 1)
                self._new_pod(obj, 0, {"phase": "Running"})
            return
        pods = self._pods(obj)
        if not pods:  # not made through this API (a test's stand-in): no controller plays it
            return
        if outcome == "evict" and self.reads[name] == 1:
            pods[0]["status"] = {"phase": "Failed", "reason": "Evicted", "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]}
            self._new_pod(obj, 1, {"phase": "Running"})  # the pod failure policy ignores it: a new pod
            return
        if self.reads[name] < after:
            return
        pod = pods[-1]
        if outcome in ("succeed", "evict"):
            self.on_success(obj)
            pod["status"] = {"phase": "Succeeded"}
            obj["status"] = {"conditions": [{"type": "Succeeded" if obj["kind"] == "PyTorchJob" else "Complete", "status": "True"}]}
            return
        code = 1 if outcome == "fail" else int(outcome.split(":")[1])
        pod["status"] = {"phase": "Failed", "containerStatuses": [{"name": "main", "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]}
        rules = (obj["spec"].get("podFailurePolicy") or {}).get("rules", [])
        matching = [i for i, r in enumerate(rules) if r["action"] == "FailJob" and code in r["onExitCodes"]["values"]]
        if obj["kind"] == "Job" and matching:
            cond = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                    "message": f"Container unsupft for pod {obj['metadata']['namespace']}/{pod['metadata']['name']} failed with exit code {code} matching FailJob rule at index {matching[0]}"}
        elif obj["kind"] == "Job":
            cond = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
        else:
            cond = {"type": "Failed", "status": "True", "reason": f"{obj['kind']}Failed", "message": f"{obj['kind']} {name} is failed because 1 Master replica(s) failed."}
        obj["status"] = {"conditions": [cond]}

    # ------------------------------------------------------------------------- deletion ---
    def _delete(self, key: tuple[str, str, str], foreground: bool) -> None:
        obj = self.objects[key]
        if foreground and self._dependents(obj):
            obj["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
            self._collect(orphans_of={obj["metadata"]["uid"]})
            return
        del self.objects[key]
        self._collect()

    def _dependents(self, obj: dict[str, Any]) -> list[tuple]:
        uid = obj["metadata"]["uid"]
        return [k for k, o in self.objects.items() if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]

    def _collect(self, orphans_of: set[str] = frozenset()) -> None:
        """The garbage collector: delete objects whose owners are gone (or being deleted), in cascade."""
        while True:
            uids = {o["metadata"]["uid"] for o in self.objects.values()} - set(orphans_of)
            gone = [k for k, o in self.objects.items() if o["metadata"].get("ownerReferences")
                    and not any(r.get("uid") in uids for r in o["metadata"]["ownerReferences"])]
            if not gone:
                return
            for k in gone:
                self.log.append(("gc", k[2]))
                del self.objects[k]

    # -------------------------------------------------------------------------- server ---
    def _handler(emu):  # noqa: N805 - the emulator, seen from its request handler
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "code": code, "message": message}, headers)

            def _fault(self) -> bool:
                """Answer with an injected fault instead of the real thing; True when one fired."""
                with emu.lock:
                    for fault in emu.faults:
                        if fault["method"] == self.command and fault["path"] in self.path and fault["times"] > 0:
                            fault["times"] -= 1
                            break
                    else:
                        return False
                self._body()
                status = fault["status"]
                if status == "reset":
                    self.close_connection = True
                    self.connection.close()
                elif status == 403:
                    self._status(403, "Forbidden", f'jobs.batch "x" is forbidden: {QUOTA_MESSAGE}')
                elif status == 429:
                    self._status(429, "TooManyRequests", "the server has received too many requests", {"Retry-After": "0"})
                else:
                    self._status(status, "InternalError", "etcdserver: request timed out")
                return True

            def _body(self) -> dict | None:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _route(self):
                """(plural, namespace, name, subresource, query) or a discovery group, else None."""
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if parts[:2] == ["api", "v1"] and len(parts) >= 4 and parts[2] == "namespaces" and parts[4] in CORE:
                    return parts[4], parts[3], (parts[5] if len(parts) > 5 else None), (parts[6] if len(parts) > 6 else None), query
                if parts[0] == "apis" and len(parts) >= 3:
                    group = f"{parts[1]}/{parts[2]}"
                    if group not in emu.installed:
                        return None
                    if len(parts) == 3:
                        return group
                    if len(parts) >= 6 and parts[3] == "namespaces" and parts[5] in GROUPS[group]:
                        return parts[5], parts[4], (parts[6] if len(parts) > 6 else None), (parts[7] if len(parts) > 7 else None), query
                return None

            def _not_found(self, what: str) -> None:
                self._status(404, "NotFound", f"{what} not found")

            def do_POST(self) -> None:
                if self._fault():
                    return
                route = self._route()
                body = self._body()
                if not isinstance(route, tuple):
                    return self._not_found("the server could not find the requested resource")
                plural, ns, _, _, _ = route
                name = body["metadata"]["name"]
                with emu.lock:
                    emu.log.append(("create", name))
                    refused = emu.refusal("create", plural, ns, name)
                    if refused:
                        return self._send(refused["code"], refused)
                    if (plural, ns, name) in emu.objects:
                        return self._status(409, "AlreadyExists", f"{plural} {name!r} already exists")
                    owners = body["metadata"].get("ownerReferences") or []
                    uids = {o["metadata"]["uid"] for o in emu.objects.values()}
                    body.pop("status", None)  # a status subresource: create ignores status
                    obj = emu.add(plural, ns, body)
                    if owners and not any(r["uid"] in uids for r in owners):
                        emu._collect()  # owner already gone: the garbage collector takes it at once
                    elif plural in STAGE_KINDS and not body["metadata"]["labels"].get("app.kubernetes.io/component") == "driver":
                        emu._created(obj)
                self._send(201, obj)

            def do_GET(self) -> None:
                if self._fault():
                    return
                route = self._route()
                if route is None:
                    return self._not_found("the server could not find the requested resource")
                if isinstance(route, str):  # discovery
                    return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": route,
                                            "resources": [{"name": p, "namespaced": True, "kind": p, "verbs": ["create", "get", "list", "delete"]}
                                                          for p in GROUPS[route]]})
                plural, ns, name, _, query = route
                with emu.lock:
                    if name is None:
                        items = [o for (p, n, _), o in emu.objects.items() if p == plural and n == ns
                                 and _matches(o["metadata"].get("labels") or {}, query.get("labelSelector", ""))
                                 and all(_field(o, k) == v for k, v in (t.split("=") for t in filter(None, query.get("fieldSelector", "").split(","))))]
                        return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                    obj = emu.objects.get((plural, ns, name))
                    if obj is None:
                        return self._not_found(name)
                    if obj["metadata"].get("deletionTimestamp"):  # foreground deletion: gone after this read
                        del emu.objects[(plural, ns, name)]
                    elif plural in STAGE_KINDS and obj["metadata"]["labels"].get("app.kubernetes.io/component") != "driver":
                        emu._advance(obj)
                    self._send(200, obj)

            def do_DELETE(self) -> None:
                if self._fault():
                    return
                route = self._route()
                body = self._body() or {}
                if not isinstance(route, tuple):
                    return self._not_found("the server could not find the requested resource")
                plural, ns, name, _, query = route
                with emu.lock:
                    emu.log.append(("delete", name))
                    if (plural, ns, name) not in emu.objects:
                        return self._not_found(name)
                    policy = body.get("propagationPolicy") or query.get("propagationPolicy")
                    emu._delete((plural, ns, name), foreground=policy == "Foreground")
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return Handler
