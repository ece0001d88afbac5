"""The annotate page acts only on requests from its own page (issue 24, case 2), over real HTTP.

A real `make_server` on 127.0.0.1 gets each attack with every other header honest, so each check
is shown to stand on its own; after each, the round's files (progress.json, the labels file) are
byte-identical, the answer is a 4xx with a JSON error, and the server logged one line. The browser
side (another origin's `fetch(no-cors)` and forms) is in tests/test_annotate_web.py.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from tests.test_annotate_web import serving, waiting_round
from unsupft.select.annotate_web import TOKEN_HEADER, make_server
from unsupft.select.annotators import labels_uri

KEYS = ["img-a", "img-b", "img-c"]
HONEST_LABELS = {"img-a": "class2", "img-b": "class11", "img-c": "?"}
DEEP = b"[" * 200_000 + b"]" * 200_000


class Page(NamedTuple):
    out: Path
    port: int
    token: str
    labels_written: threading.Event


def send(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str | None] | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (None leaves one out): status, headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            if value is not None:
                conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def honest(page: Page, changed: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """The headers the page's own script sends, with `changed` ones replaced (None: left out)."""
    own = f"127.0.0.1:{page.port}"
    headers = {"Host": own, "Origin": f"http://{own}", "Content-Type": "application/json", TOKEN_HEADER: page.token}
    return {**headers, **(changed or {})}


def round_files(page: Page) -> dict[str, bytes]:
    return {str(p.relative_to(page.out)): p.read_bytes() for p in sorted(page.out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """A waiting round served in this process, one honest answer already saved in progress.json."""
    out = tmp_path_factory.mktemp("annotate") / "label"
    waiting_round(str(out), KEYS)
    server, labels_written = make_server(str(out), 1, 0)
    with serving(server):
        port = server.server_address[1]
        status, _, html = send(port, "GET", "/", headers={"Host": f"127.0.0.1:{port}"})
        assert status == 200
        token = re.search(rb'TOKEN = "([^"]+)"', html).group(1).decode()
        served = Page(out, port, token, labels_written)
        body = json.dumps({"img-a": "class2"}).encode()
        assert send(port, "POST", "/progress", body, honest(served))[0] == 200
        assert (out / "labels" / "round-1.progress.json").exists()
        yield served


ANSWER = json.dumps({"img-a": "class0", "img-b": "class0", "img-c": "class0"}).encode()
ATTACKS = {  # name: (body, headers changed from the page's own, status)
    "no token": (ANSWER, {TOKEN_HEADER: None}, 403),
    "wrong token": (ANSWER, {TOKEN_HEADER: "A" * 43}, 403),
    "another local origin": (ANSWER, {"Origin": "http://127.0.0.1:1"}, 403),
    "null origin": (ANSWER, {"Origin": "null"}, 403),
    "DNS rebinding host": (ANSWER, {"Host": "attacker.example", "Origin": "http://attacker.example"}, 403),
    "text/plain": (ANSWER, {"Content-Type": "text/plain"}, 415),
    "form-encoded": (b"img-a=class0&img-b=class0&img-c=class0",
                     {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    "no content type": (ANSWER, {"Content-Type": None}, 415),
    "no length": (b"", {"Content-Length": None}, 411),
    "oversize": (b"", {"Content-Length": str(10**9)}, 413),
    "array": (b"[]", {}, 400),
    "string": (b'"img-a"', {}, 400),
    "200,000 deep": (DEEP, {}, 400),
    "nested object": (b'{"img-a": {"img-b": "class0"}}', {}, 400),
    "not JSON": (b'{"img-a": ', {}, 400),
    "not UTF-8": (b'{"img-a": "\xff"}', {}, 400),
    "unknown key": (json.dumps({"img-a": "class0", "../../victim": "class0"}).encode(), {}, 400),
    "unknown label": (json.dumps({"img-a": "class99"}).encode(), {}, 400),
    "number label": (b'{"img-a": 3}', {}, 400),
}


@pytest.mark.parametrize("path", ["/labels", "/progress"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_refused_write_changes_nothing(page, capsys, attack, path):
    body, changed, status = ATTACKS[attack]
    before = round_files(page)
    got, _, answer = send(page.port, "POST", path, body, honest(page, changed))
    assert (got, round_files(page)) == (status, before)
    assert set(json.loads(answer)) == {"error"}
    logged = capsys.readouterr().err.splitlines()
    assert len(logged) == 1 and logged[0].startswith(f"refused POST '{path}': "), logged
    assert not page.labels_written.is_set()


@pytest.mark.parametrize("path", ["/", "/task", "/img/img-a"])
def test_reads_under_another_name_are_refused(page, capsys, path):
    """A site whose name resolves to 127.0.0.1 (DNS rebinding) reads neither the token nor the round."""
    own = f"127.0.0.1:{page.port}"
    assert send(page.port, "GET", path, headers={"Host": own})[0] == 200
    status, _, answer = send(page.port, "GET", path, headers={"Host": f"attacker.example:{page.port}"})
    assert status == 403 and page.token.encode() not in answer
    status, _, answer = send(page.port, "GET", path, headers={"Host": own, "Origin": "http://127.0.0.1:1"})
    assert status == 403 and page.token.encode() not in answer
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_the_page_cannot_be_framed_by_another_site(page):
    _, headers, _ = send(page.port, "GET", "/", headers={"Host": f"127.0.0.1:{page.port}"})
    assert headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def test_an_incomplete_round_is_refused_then_the_honest_round_is_written(page, capsys):
    partial = json.dumps({"img-a": "class2"}).encode()
    assert send(page.port, "POST", "/labels", partial, honest(page))[0] == 400
    assert "missing keys img-b, img-c" in capsys.readouterr().err
    assert not page.labels_written.is_set()

    status, _, answer = send(page.port, "POST", "/labels", json.dumps(HONEST_LABELS).encode(), honest(page))
    assert status == 200 and page.labels_written.wait(10)  # set just after the answer is sent
    assert json.loads(answer)["uri"] == labels_uri(str(page.out), 1)
    assert (page.out / "labels" / "round-1.csv").read_text().splitlines() == [
        "key,label", "img-a,class2", "img-b,class11", "img-c,?"]
