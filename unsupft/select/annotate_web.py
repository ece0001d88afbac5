"""`unsupft annotate RUN_OR_URI`: a local web page to label a waiting manual round.

It finds the round whose `requests/round-N.csv` has no `labels/round-N.csv` yet (under the label
stage's output, or anywhere below a run's prefix), serves one page on 127.0.0.1 at a free port and
prints its URL. The page shows each image large (pixelated upscaling, so 28 px digits stay
readable), the class names as buttons with keyboard shortcuts (1-9, 0, then letters), Backspace to
go back, and a progress count. When every image has a label it posts them; the server validates
them with the same parser the stage uses, writes the labels file through the store and exits.
Only the standard library's http.server: nothing to install for the person labeling.
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import click

from unsupft import store
from unsupft.errors import UserError, report_user_errors
from unsupft.select.annotators import (
    classes_uri,
    format_labels,
    image_uri,
    labels_uri,
    parse_labels,
    read_requested_keys,
)

_REQUEST = re.compile(r"^(?:(.*)/)?requests/round-(\d+)\.csv$")
SHORTCUTS = "1234567890abcdefghijklmnopqrstuvwxyz"


def find_waiting_round(uri: str) -> tuple[str, int]:
    """(label stage output URI, round) of the one round that waits for labels below `uri`."""
    names = store.list_prefix(uri)
    present = set(names)
    waiting = []
    for name in names:
        match = _REQUEST.match(name)
        if match:
            sub, rnd = match.group(1), int(match.group(2))
            answer = f"{sub}/labels/round-{rnd}.csv" if sub else f"labels/round-{rnd}.csv"
            if answer not in present:
                waiting.append((store.join(uri, sub) if sub else uri, rnd))
    if not waiting:
        raise UserError(f"{uri}: no round waits for labels (no requests/round-N.csv without labels)")
    stages = {out for out, _ in waiting}
    if len(stages) > 1:
        raise UserError(f"{uri}: several label stages wait: {', '.join(sorted(stages))}; pass one of them")
    return min(waiting, key=lambda w: w[1])


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>unsupft annotate</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }
 #img { width: 320px; height: 320px; image-rendering: pixelated; object-fit: contain;
        background: #222; border: 1px solid #999; display: block; margin: 1em 0; }
 button.cls { font-size: 1.1em; margin: .2em; padding: .4em .8em; cursor: pointer; }
 button.cls.current { outline: 3px solid #e80; }
 kbd { background: #eee; border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; font-size: .9em; }
 #progress { font-size: 1.2em; }
</style></head>
<body>
<h2>Label round <span id="round"></span></h2>
<div id="progress"></div>
<div id="key"></div>
<img id="img" alt="image to label">
<div id="buttons"></div>
<p><kbd>Backspace</kbd> back &middot; labels are saved when every image has one</p>
<div id="status"></div>
<script>
const SHORTCUTS = "__SHORTCUTS__";
let task = null, pos = 0, labels = {};
function show() {
  const key = task.keys[pos];
  document.getElementById("progress").textContent =
    `${Object.keys(labels).length} / ${task.keys.length} labeled — image ${pos + 1}`;
  document.getElementById("key").textContent = key;
  document.getElementById("img").src = "img/" + encodeURIComponent(key);
  document.querySelectorAll("button.cls").forEach(b =>
    b.classList.toggle("current", labels[key] === b.dataset.cls));
}
async function save() {
  document.getElementById("status").textContent = "saving…";
  const r = await fetch("labels", {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: JSON.stringify(labels)});
  const body = await r.json();
  document.getElementById("status").textContent = r.ok ? "saved " + body.uri + " — you can close this page"
                                                       : "error: " + body.error;
}
function pick(name) {
  labels[task.keys[pos]] = name;
  const next = task.keys.findIndex(k => !(k in labels));
  if (next < 0) { show(); save(); return; }
  pos = next; show();
}
document.addEventListener("keydown", e => {
  if (!task) return;
  if (e.key === "Backspace") { pos = Math.max(0, pos - 1); show(); e.preventDefault(); return; }
  const i = SHORTCUTS.indexOf(e.key.toLowerCase());
  if (i >= 0 && i < task.classes.length) pick(task.classes[i]);
});
fetch("task").then(r => r.json()).then(t => {
  task = t;
  document.getElementById("round").textContent = t.round;
  const box = document.getElementById("buttons");
  t.classes.forEach((name, i) => {
    const b = document.createElement("button");
    b.className = "cls"; b.dataset.cls = name;
    b.innerHTML = (i < SHORTCUTS.length ? `<kbd>${SHORTCUTS[i]}</kbd> ` : "") + name;
    b.onclick = () => pick(name);
    box.appendChild(b);
  });
  show();
});
</script></body></html>
""".replace("__SHORTCUTS__", SHORTCUTS)


def make_server(out: str, round_index: int, port: int = 0) -> ThreadingHTTPServer:
    """A server for one round; `server.labels_written` is set once the labels file is stored."""
    keys = read_requested_keys(out, round_index)
    classes = json.loads(store.read_text(classes_uri(out)))
    task = json.dumps({"round": round_index, "keys": keys, "classes": classes}).encode()
    answer = labels_uri(out, round_index)
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/":
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/task":
                self._send(HTTPStatus.OK, task, "application/json")
            elif self.path.startswith("/img/") and unquote(self.path[5:]) in keys:
                data = store.read_bytes(image_uri(out, round_index, unquote(self.path[5:])))
                self._send(HTTPStatus.OK, data, "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/labels":
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
                return
            try:
                chosen = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                text = format_labels({k: chosen[k] for k in keys if k in chosen})
                parse_labels(text, "labels from the page", keys, classes)
            except (UserError, ValueError, AttributeError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            store.write_text(answer, text)
            self._json(HTTPStatus.OK, {"uri": answer})
            done.set()

        def log_message(self, format: str, *args: object) -> None:  # quiet: the URL is the output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.labels_written = done  # type: ignore[attr-defined]
    return server


def serve_round(out: str, round_index: int, port: int = 0) -> str:
    """Serve until the labels are written; returns the labels file's URI."""
    server = make_server(out, round_index, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, bound = server.server_address[:2]
    click.echo(f"labeling round {round_index} of {out}: open http://{host}:{bound}/", err=False)
    try:
        server.labels_written.wait()  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
    answer = labels_uri(out, round_index)
    click.echo(f"wrote {answer}; resume with `unsupft label --resume --out {out}` (or let the controller retry)")
    return answer


@click.command("annotate")
@click.argument("run_or_uri")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0 = any free port")
@report_user_errors
def annotate_command(run_or_uri: str, port: int) -> None:
    """Label the waiting round of a label stage (its --out URI, or a run prefix containing one)."""
    out, round_index = find_waiting_round(store.normalize(run_or_uri))
    serve_round(out, round_index, port)
