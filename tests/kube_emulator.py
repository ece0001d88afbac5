"""A small HTTP emulator of the Kubernetes API endpoints the driver uses, with scripted outcomes.

It speaks real HTTP/JSON to the official `kubernetes` client: create (201, or 409 when the name
exists), get (404 when absent), list by label selector, delete, for batch/v1 Jobs and
kubeflow.org/v1 PyTorchJobs. `script` maps an object name to the outcome its status reaches after
a number of reads: "succeed" (Complete/Succeeded; `on_success(obj)` plays the container, e.g.
writes `_DONE.json`), "fail" (Failed), "wait" (a Job failed by its pod failure policy on exit 75).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

PATHS = {("batch", "jobs"), ("kubeflow.org", "pytorchjobs")}


class Emulator:
    def __init__(self, on_success: Callable[[dict], None] = lambda obj: None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> obj
        self.script: dict[str, tuple[str, int]] = {}
        self.reads: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []  # (verb, name)
        self.on_success = on_success
        self.lock = threading.Lock()
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

    def _advance(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        outcome, after = self.script.get(name, ("succeed", 1))
        self.reads[name] = self.reads.get(name, 0) + 1
        if self.reads[name] < after or obj.get("status", {}).get("conditions"):
            return
        pytorch = obj["kind"] == "PyTorchJob"
        if outcome == "succeed":
            self.on_success(obj)
            cond = {"type": "Succeeded" if pytorch else "Complete", "status": "True"}
        elif outcome == "wait":
            cond = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                    "message": "Container unsupft for pod x failed with exit code 75 matching FailJob rule at index 0"}
        else:
            cond = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}
        obj["status"] = {"conditions": [cond]}

    def _handler(emu):  # noqa: N805 - the emulator, seen from its request handler
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                # apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]
                if len(parts) < 6 or parts[0] != "apis" or (parts[1], parts[5]) not in PATHS:
                    return None
                return parts[5], parts[4], (parts[6] if len(parts) > 6 else None), parse_qs(url.query)

            def _not_found(self, name: str) -> None:
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                 "code": 404, "message": f"{name} not found"})

            def do_POST(self) -> None:
                route = self._route()
                if route is None:
                    return self._not_found(self.path)
                plural, ns, _, _ = route
                obj = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = obj["metadata"]["name"]
                with emu.lock:
                    emu.log.append(("create", name))
                    if (plural, ns, name) in emu.objects:
                        return self._send(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "AlreadyExists", "code": 409, "message": f"{name} exists"})
                    emu.objects[(plural, ns, name)] = obj
                self._send(201, obj)

            def do_GET(self) -> None:
                route = self._route()
                if route is None:
                    return self._not_found(self.path)
                plural, ns, name, query = route
                with emu.lock:
                    if name is None:
                        wanted = dict(kv.split("=") for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                        items = [o for (p, n, _), o in emu.objects.items() if p == plural and n == ns
                                 and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
                        return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                    obj = emu.objects.get((plural, ns, name))
                    if obj is None:
                        return self._not_found(name)
                    emu._advance(obj)
                    self._send(200, obj)

            def do_DELETE(self) -> None:
                route = self._route()
                if route is None:
                    return self._not_found(self.path)
                plural, ns, name, _ = route
                with emu.lock:
                    emu.log.append(("delete", name))
                    if emu.objects.pop((plural, ns, name), None) is None:
                        return self._not_found(name)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return Handler
