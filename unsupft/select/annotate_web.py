"""`unsupft annotate RUN_OR_URI`: a local web page to label a waiting manual round.

It finds the round whose `requests/round-N.csv` has no `labels/round-N.csv` yet (under the label
stage's output, or anywhere below a run's prefix), serves one page on 127.0.0.1 at a free port and
prints its URL. The page shows each image large (pixelated upscaling, so 28 px digits stay
readable) or the whole round as a grid (Tab switches; click an image to select it), the class
names as buttons with keyboard shortcuts (the names themselves when they are single characters,
as for digits; otherwise 1-9, 0, then letters), `?` for "not sure" (the image goes back to the
pool and costs no budget), Backspace to go back and a progress count. When the label stage sent
its model's guesses (rounds after the first), the guess is marked and Enter accepts it, the way
labeling tools pre-annotate for active learning. Every answer is saved to the store at once
(`labels/round-N.progress.json`), so closing the tab or stopping the server loses nothing; when
every image has an answer the server validates them with the parser the stage uses, writes the
labels file through the store and exits. Only the standard library's http.server: nothing to
install for the person labeling.

Any web page the person has open can send requests to 127.0.0.1, so the server acts only on
requests from its own page: the Host must be the address it listens on (another site's name that
resolves to 127.0.0.1, DNS rebinding, is refused), an Origin, when the browser sends one, must be
the page's own, a write must be `application/json` (which another site cannot send without
asking first) and carry the random token embedded in the page, and its body is bounded and
checked against the round's keys and classes before anything is replaced. A refused request gets
a 4xx with a one-line JSON error and one log line, and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import click

from unsupft import store
from unsupft.errors import UserError
from unsupft.select.annotators import (
    UNSURE,
    classes_uri,
    csv_text,
    image_uri,
    labels_uri,
    parse_labels,
    read_request,
)

_REQUEST = re.compile(r"^(?:(.*)/)?requests/round-(\d+)\.csv$")
SHORTCUTS = "1234567890abcdefghijklmnopqrstuvwxyz"
TOKEN_HEADER = "X-Unsupft-Token"
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# On every response: no other site may frame the page (a click on a framed page would answer with
# the page's own token), embed its images or task, or have it sniffed into another type.
_GUARD_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                  "Cross-Origin-Resource-Policy": "same-origin", "X-Content-Type-Options": "nosniff"}


def shortcuts(classes: list[str]) -> list[str]:
    """The key that picks each class: its own name when every name is one distinct character
    (digits: `1` is class "1"), else by position. `?` is kept for "not sure"."""
    names = [c.lower() for c in classes]
    if all(len(n) == 1 for n in names) and len(set(names)) == len(names) and UNSURE not in names:
        return names
    return [SHORTCUTS[i] if i < len(SHORTCUTS) else "" for i in range(len(classes))]


def progress_uri(out: str, round_index: int) -> str:
    return store.join(out, "labels", f"round-{round_index}.progress.json")


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


class Refused(Exception):
    """A request the page's server does not act on: the HTTP status to answer and a one-line reason."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def shown(value: str) -> str:
    """A request's own text (a path, a header) as it goes into a log line: quoted, escaped, short."""
    return ascii(value[:80])


def read_answers(body: bytes, keys: list[str], allowed: set[str]) -> dict[str, str]:
    """The answers a POST carries, in the round's order: one flat JSON object from this round's
    keys to class names (or `?`). Checked whole before anything is replaced; nesting is refused
    before parsing, so no body reaches the parser's recursion limit."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "body is not UTF-8") from None
    outside_strings = _JSON_STRING.sub("", text)
    if outside_strings.count("{") + outside_strings.count("[") > 1:
        raise Refused(HTTPStatus.BAD_REQUEST, "body nests JSON; expected one flat object of key: label")
    try:
        chosen = json.loads(text)
    except ValueError as exc:
        raise Refused(HTTPStatus.BAD_REQUEST, f"body is not JSON ({exc})") from None
    if not isinstance(chosen, dict):
        raise Refused(HTTPStatus.BAD_REQUEST, "body must be a JSON object of key: label")
    wanted = set(keys)
    unknown = [key for key in chosen if key not in wanted]
    if unknown:
        raise Refused(HTTPStatus.BAD_REQUEST, f"unknown key {shown(unknown[0])} (not in this round)")
    wrong = [(key, label) for key, label in chosen.items() if not isinstance(label, str) or label not in allowed]
    if wrong:
        key, label = wrong[0]
        raise Refused(HTTPStatus.BAD_REQUEST, f"{shown(key)}: unknown class {json.dumps(label)[:80]}")
    return {key: chosen[key] for key in keys if key in chosen}


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>unsupft annotate</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; }
 #img { width: 320px; height: 320px; image-rendering: pixelated; object-fit: contain;
        background: #222; border: 1px solid #999; display: block; margin: 1em 0; }
 button { font-size: 1.1em; margin: .2em; padding: .4em .8em; cursor: pointer; }
 button.cls.current { outline: 3px solid #e80; }
 button.cls.guess { border: 2px dashed #06c; }
 button.cls.guess::after { content: " (model's guess, Enter)"; color: #06c; font-size: .8em; }
 kbd { background: #eee; border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; font-size: .9em; }
 #progress { font-size: 1.2em; }
 #grid { display: none; grid-template-columns: repeat(auto-fill, 112px); gap: 8px; margin: 1em 0; }
 body.grid #grid { display: grid; }
 body.grid #img { display: none; }
 .cell { border: 3px solid transparent; background: #fff; text-align: center; cursor: pointer; padding: 2px; }
 .cell img { width: 100px; height: 100px; image-rendering: pixelated; object-fit: contain; background: #222; }
 .cell.current { border-color: #e80; }
 .cell .ans { font-weight: bold; } .cell .guessed { color: #06c; font-style: italic; }
 .cell .unsure { color: #a00; }
</style></head>
<body>
<h2>Label round <span id="round"></span></h2>
<div id="progress"></div>
<div id="key"></div>
<img id="img" alt="image to label">
<div id="grid"></div>
<div id="buttons"></div>
<p><kbd>Enter</kbd> accept the model's guess &middot; <kbd>?</kbd> not sure &middot;
   <kbd>Backspace</kbd> back &middot; <kbd>Tab</kbd> <button id="view">grid view</button> &middot;
   every answer is saved as you go</p>
<div id="status"></div>
<script>
const UNSURE = "?", TOKEN = "__TOKEN__";  // the server's token for this session: every write carries it
let task = null, pos = 0, labels = {}, finished = false;
const shown = v => v === UNSURE ? "not sure" : v;
function render() {
  const key = task.keys[pos], guess = task.guesses[key];
  const unsure = Object.values(labels).filter(v => v === UNSURE).length;
  document.getElementById("progress").textContent =
    `${Object.keys(labels).length} / ${task.keys.length} answered` + (unsure ? ` (${unsure} not sure)` : "") +
    ` — image ${pos + 1}`;
  document.getElementById("key").textContent = key;
  document.getElementById("img").src = "img/" + encodeURIComponent(key);
  document.querySelectorAll("button.cls").forEach(b => {
    b.classList.toggle("current", labels[key] === b.dataset.cls);
    b.classList.toggle("guess", guess === b.dataset.cls);
  });
  document.querySelectorAll(".cell").forEach((c, i) => {
    const k = task.keys[i], a = labels[k];
    c.classList.toggle("current", i === pos);
    const cap = c.querySelector("div");
    cap.className = a === undefined ? "guessed" : a === UNSURE ? "unsure" : "ans";
    cap.textContent = a !== undefined ? shown(a) : task.guesses[k] !== undefined ? task.guesses[k] + "?" : "\u00a0";
  });
  const cur = document.querySelectorAll(".cell")[pos];
  if (document.body.classList.contains("grid") && cur) cur.scrollIntoView({block: "nearest"});
}
async function post(path, body) {
  const r = await fetch(path, {method: "POST", body: JSON.stringify(body),
                               headers: {"Content-Type": "application/json", "X-Unsupft-Token": TOKEN}});
  return [r.ok, await r.json()];
}
// Saves go one after another: the server handles requests in threads, so two posts in flight
// could land in the other order and an older snapshot overwrite a newer one (a lost answer).
let saving = Promise.resolve();
function persist() {
  const snapshot = {...labels};
  saving = saving.then(async () => {
    const [ok, body] = await post("progress", snapshot);
    if (!finished) document.getElementById("status").textContent =
      ok ? `progress saved (${Object.keys(snapshot).length} answers)` : "error: " + body.error;
  });
}
async function finish() {
  finished = true;
  document.getElementById("status").textContent = "saving…";
  await saving;
  const [ok, body] = await post("labels", labels);
  document.getElementById("status").textContent = ok ? "saved " + body.uri + " — you can close this page"
                                                     : "error: " + body.error;
}
function pick(name) {
  labels[task.keys[pos]] = name;
  persist();
  const n = task.keys.length;
  for (let step = 1; step <= n; step++) {
    const i = (pos + step) % n;
    if (!(task.keys[i] in labels)) { pos = i; render(); return; }
  }
  render(); finish();
}
function toggleView() {
  document.body.classList.toggle("grid");
  document.getElementById("view").textContent = document.body.classList.contains("grid") ? "one image" : "grid view";
  render();
}
document.addEventListener("keydown", e => {
  if (!task || e.ctrlKey || e.metaKey || e.altKey) return;
  const grid = document.body.classList.contains("grid"), cols = Math.max(1, Math.floor(
    document.getElementById("grid").clientWidth / 120));
  const move = {ArrowLeft: -1, ArrowRight: 1, ArrowUp: grid ? -cols : -1, ArrowDown: grid ? cols : 1}[e.key];
  if (e.key === "Tab") { toggleView(); e.preventDefault(); return; }
  if (e.key === "Backspace") { pos = Math.max(0, pos - 1); render(); e.preventDefault(); return; }
  if (move !== undefined) { pos = Math.min(task.keys.length - 1, Math.max(0, pos + move)); render(); e.preventDefault(); return; }
  if (e.key === "Enter") { const g = task.guesses[task.keys[pos]]; if (g !== undefined) pick(g); e.preventDefault(); return; }
  if (e.key === UNSURE) { pick(UNSURE); return; }
  const i = task.shortcuts.indexOf(e.key.toLowerCase());
  if (i >= 0 && e.key.length === 1) pick(task.classes[i]);
});
fetch("task").then(r => r.json()).then(t => {
  task = t; labels = t.saved;
  document.getElementById("round").textContent = t.round;
  const box = document.getElementById("buttons");
  const add = (name, key, text) => {
    const b = document.createElement("button");
    b.className = "cls"; b.dataset.cls = name;
    if (key) { const k = document.createElement("kbd"); k.textContent = key; b.append(k, " "); }
    b.append(text);  // text, never HTML: class names come from the data
    b.onclick = () => pick(name);
    box.appendChild(b);
  };
  t.classes.forEach((name, i) => add(name, t.shortcuts[i], name));
  add(UNSURE, UNSURE, "not sure");
  const grid = document.getElementById("grid");
  t.keys.forEach((k, i) => {
    const c = document.createElement("div");
    c.className = "cell"; c.dataset.key = k;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = ""; img.src = "img/" + encodeURIComponent(k);
    c.append(img, document.createElement("div"));
    c.onclick = () => { pos = i; render(); };
    grid.appendChild(c);
  });
  document.getElementById("view").onclick = e => { toggleView(); e.target.blur(); };
  const first = t.keys.findIndex(k => !(k in labels));
  pos = first < 0 ? 0 : first;
  render();
  if (first < 0) finish();  // every answer was saved before: write the labels file
});
</script></body></html>
"""


def make_server(out: str, round_index: int, port: int) -> tuple[ThreadingHTTPServer, threading.Event]:
    """A server for one round, and the event set once the labels file is stored."""
    keys, guesses = read_request(out, round_index)
    classes = json.loads(store.read_text(classes_uri(out)))
    answer, progress = labels_uri(out, round_index), progress_uri(out, round_index)
    allowed = set(classes) | {UNSURE}
    task_fields = {"round": round_index, "keys": keys, "classes": classes, "shortcuts": shortcuts(classes),
                   "guesses": {k: g for k, g in guesses.items() if g in classes}}
    token = secrets.token_urlsafe(32)
    page = PAGE.replace("__TOKEN__", token).encode()
    # The longest honest body: every key answered with the longest name, written the way Python
    # escapes it (JSON.stringify never writes more), and room for another client's formatting.
    max_body = len(json.dumps(dict.fromkeys(keys, max([*classes, UNSURE], key=len)))) + 2**20
    lock = threading.Lock()  # one answer file write at a time; the page posts after every answer
    done = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in _GUARD_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _refuse(self, refused: Refused) -> None:
            click.echo(f"refused {self.command} {shown(self.path)}: {refused}", err=True)
            self._json(refused.status, {"error": str(refused)})

        def _check_own_origin(self) -> None:
            """Refuse a request addressed to another name (a site whose name resolves to
            127.0.0.1) or sent by another site's page."""
            port = self.server.server_address[1]
            host = self.headers.get("Host", "")
            if host not in (f"127.0.0.1:{port}", f"localhost:{port}"):
                raise Refused(HTTPStatus.FORBIDDEN, f"Host {shown(host)} is not this server")
            origin = self.headers.get("Origin")
            if origin is not None and origin != f"http://{host}":
                raise Refused(HTTPStatus.FORBIDDEN, f"Origin {shown(origin)} is not this page")

        def _read_body(self) -> bytes:
            """The request's body, read whole when its declared size fits the round (so that even a
            refusal is answered on a clean connection), refused unread when it does not."""
            length = self.headers.get("Content-Length", "")
            if not (length.isascii() and length.isdigit()):
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
            if int(length) > max_body:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"body of {int(length)} bytes is over this round's {max_body}")
            return self.rfile.read(int(length))

        def _check_write(self) -> None:
            """A write comes from the page's own script: JSON, which another site's page cannot
            send without a preflight this server never grants, and the token only the page holds."""
            self._check_own_origin()
            if self.headers.get_content_type() != "application/json":
                raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json")
            if not hmac.compare_digest(self.headers.get(TOKEN_HEADER, "").encode(), token.encode()):
                raise Refused(HTTPStatus.FORBIDDEN, f"missing or wrong {TOKEN_HEADER}")
            if self.path not in ("/labels", "/progress"):
                raise Refused(HTTPStatus.NOT_FOUND, "not found")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                self._check_own_origin()
            except Refused as refused:
                self._refuse(refused)
                return
            if self.path == "/":
                self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
            elif self.path == "/task":
                with lock:
                    current = store.read_json(progress) if store.exists(progress) else {}
                self._json(HTTPStatus.OK, {**task_fields, "saved": current})
            elif self.path.startswith("/img/") and (key := unquote(self.path[5:])) in keys:
                self._send(HTTPStatus.OK, store.read_bytes(image_uri(out, round_index, key)), "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = self._read_body()
                self._check_write()
                answers = read_answers(body, keys, allowed)
                text = csv_text(["key", "label"], answers.items())
                if self.path == "/labels":
                    try:
                        parse_labels(text, "labels from the page", keys, classes)
                    except UserError as exc:
                        raise Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
            except Refused as refused:
                self._refuse(refused)
                return
            with lock:
                if self.path == "/progress":
                    store.write_json(progress, answers)
                    self._json(HTTPStatus.OK, {"uri": progress})
                    return
                store.write_text(answer, text)
            self._json(HTTPStatus.OK, {"uri": answer})
            done.set()

        def log_message(self, format: str, *args: object) -> None:  # quiet: the URL is the output
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler), done


def serve_round(out: str, round_index: int, port: int) -> str:
    """Serve until the labels are written; returns the labels file's URI."""
    server, labels_written = make_server(out, round_index, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, bound = server.server_address[:2]
    click.echo(f"labeling round {round_index} of {out}: open http://{host}:{bound}/")
    try:
        labels_written.wait()
    finally:
        server.shutdown()
        server.server_close()
    answer = labels_uri(out, round_index)
    click.echo(f"wrote {answer}; resume with `unsupft label --resume --out {out}` (or let the controller retry)")
    return answer
