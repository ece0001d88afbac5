"""`unsupft annotate` driven in a real headless browser (Debian's chromium through playwright)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import string
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from unsupft import store
from unsupft.select.annotate_web import make_server, progress_uri
from unsupft.select.annotators import ManualAnnotator, WaitingForLabels, labels_uri

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(12)]  # more than 10: letters serve as shortcuts too
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent (apt-get install -y chromium)"
)


def waiting_round(out: str, keys: list[str]) -> None:
    g = torch.Generator().manual_seed(0)
    imgs = {k: torch.randint(0, 256, (3, 12, 12), generator=g, dtype=torch.uint8) for k in keys}
    with pytest.raises(WaitingForLabels):
        ManualAnnotator(out, CLASSES, imgs.__getitem__).annotate(1, keys)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium for the module; each page gets its own context (fresh cookies, storage)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def annotate_page(run: Path, browser: Any) -> Iterator[tuple[Any, subprocess.Popen]]:
    """`unsupft annotate RUN` in its own process, and its page open in headless chromium."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "unsupft", "annotate", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    context = browser.new_context(viewport={"width": 900, "height": 700})
    try:
        line = proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line + proc.stderr.read()
        page = context.new_page()
        page.goto(line.split("open ")[1].strip())
        yield page, proc
    finally:
        context.close()
        if proc.poll() is None:
            proc.kill()


def test_label_a_round_in_the_browser(tmp_path, browser):
    run = tmp_path / "run"
    out = str(run / "stages" / "label")
    keys = ["img-a", "img-b", "img-c", "img-d"]
    waiting_round(out, keys)

    with annotate_page(run, browser) as (page, proc):
        page.wait_for_selector("button.cls")
        assert page.locator("button.cls").count() == len(CLASSES) + 1  # and "not sure"
        assert page.inner_text("#key") == "img-a"
        assert "0 / 4" in page.inner_text("#progress")
        # the image really loads and is drawn large with pixelated upscaling
        page.wait_for_function("document.getElementById('img').naturalWidth === 12")
        assert page.eval_on_selector("#img", "e => getComputedStyle(e).imageRendering") == "pixelated"
        assert page.eval_on_selector("#img", "e => e.getBoundingClientRect().width") >= 300
        page.screenshot(path=str(tmp_path / "annotate.png"))
        page.keyboard.press("3")  # img-a -> class2
        page.keyboard.press("b")  # img-b -> class11 (shortcut after 1..9, 0, a)
        page.keyboard.press("Backspace")  # back to img-b, relabel it by clicking
        assert page.inner_text("#key") == "img-b"
        page.click("button.cls[data-cls='class5']")
        page.keyboard.press("0")  # img-c -> class9
        assert "3 / 4" in page.inner_text("#progress")
        page.keyboard.press("1")  # img-d -> class0: all labeled -> saved
        page.wait_for_selector("#status:has-text('saved')")
        assert proc.wait(timeout=30) == 0
    assert store.read_text(labels_uri(out, 1)).splitlines() == [
        "key,label", "img-a,class2", "img-b,class5", "img-c,class9", "img-d,class0",
    ]
    if os.environ.get("UNSUPFT_KEEP_SCREENSHOT"):
        Path(os.environ["UNSUPFT_KEEP_SCREENSHOT"]).write_bytes((tmp_path / "annotate.png").read_bytes())


def test_digit_keys_guesses_unsure_grid_and_saved_progress(tmp_path, browser):
    """Digits: `1` labels class "1"; Enter takes the model's guess; `?` is "not sure"; the grid
    labels by click and key; closing the page and the server loses no answer."""
    run = tmp_path / "run"
    out = str(run / "label")
    digits = [str(d) for d in range(10)]
    keys = [f"d{i}" for i in range(6)]
    guesses = {"d0": "7", "d1": "3", "d2": "3", "d3": "9", "d4": "0", "d5": "5"}
    g = torch.Generator().manual_seed(0)
    images = {k: torch.randint(0, 256, (1, 8, 8), generator=g, dtype=torch.uint8) for k in keys}
    annotator = ManualAnnotator(out, digits, images.__getitem__, lambda rnd, ks: {k: guesses[k] for k in ks})
    with pytest.raises(WaitingForLabels):
        annotator.annotate(2, keys)

    with annotate_page(run, browser) as (page, proc):
        page.wait_for_selector("button.cls")
        assert page.inner_text("button.cls[data-cls='1'] kbd") == "1"  # keys are the names
        assert page.get_attribute("button.cls.guess", "data-cls") == "7"  # d0's guess is marked
        page.screenshot(path=str(tmp_path / "single.png"))
        page.keyboard.press("Enter")  # d0 -> 7 (the guess)
        page.keyboard.press("1")  # d1 -> 1
        page.keyboard.press("?")  # d2 -> not sure
        page.wait_for_function("document.getElementById('status').textContent.includes('3 answers')")
        proc.terminate()  # the server is stopped and the tab closed mid-round
        proc.wait(timeout=30)
    assert not store.exists(labels_uri(out, 2))

    with annotate_page(run, browser) as (page, proc):  # a new server and page carry on where the person stopped
        page.wait_for_selector(".cell", state="attached")
        assert page.inner_text("#key") == "d3" and "3 / 6 answered (1 not sure)" in page.inner_text("#progress")
        page.keyboard.press("Tab")  # the grid of the whole round
        assert page.locator(".cell").count() == 6 and page.is_visible("#grid") and not page.is_visible("#img")
        page.wait_for_function("[...document.querySelectorAll('.cell img')].every(i => i.naturalWidth === 8)")
        assert page.inner_text(".cell[data-key='d0'] div") == "7"
        assert page.inner_text(".cell[data-key='d2'] div") == "not sure"
        assert page.inner_text(".cell[data-key='d4'] div") == "0?"  # a guess, not an answer yet
        page.screenshot(path=str(tmp_path / "grid.png"))
        page.click(".cell[data-key='d5']")
        page.keyboard.press("Enter")  # d5 -> 5 (its guess); the next open cell is d3
        assert "current" in page.get_attribute(".cell[data-key='d3']", "class")
        page.keyboard.press("8")  # d3 -> 8
        page.click(".cell[data-key='d4'] img")
        page.keyboard.press("4")  # d4 -> 4: every image answered -> the labels file
        page.wait_for_selector("#status:has-text('saved')")
        assert proc.wait(timeout=30) == 0
    assert store.read_text(labels_uri(out, 2)).splitlines() == [
        "key,label", "d0,7", "d1,1", "d2,?", "d3,8", "d4,4", "d5,5"]
    for name in ("single", "grid"):
        if os.environ.get("UNSUPFT_KEEP_SCREENSHOT"):
            Path(os.environ["UNSUPFT_KEEP_SCREENSHOT"]).with_suffix(f".{name}.png").write_bytes(
                (tmp_path / f"{name}.png").read_bytes())


# Another site's page, open in the same browser: it posts a whole round's answers to the annotate
# server the ways a page can without asking first (a no-cors fetch, a text/plain form whose field
# spells JSON, an urlencoded form) and sets its title once every answer came back.
ATTACKER_PAGE = string.Template("""<!doctype html><html><head><title>attacker</title></head><body>
<form id="plain" method="post" enctype="text/plain" action="$target/labels" target="sink0">
 <input name='$answers_but_last,"pad":"' value='"}'></form>
<form id="urlencoded" method="post" action="$target/progress" target="sink1">
 <input name="$key" value="$label"></form>
<script>
const answers = JSON.stringify($answers), sent = [];
for (const path of ["labels", "progress"])
  sent.push(fetch("$target/" + path, {method: "POST", mode: "no-cors", body: answers,
                                      headers: {"Content-Type": "application/json"}}).catch(() => null));
["plain", "urlencoded"].forEach((form, i) => {
  const sink = document.createElement("iframe");
  sink.name = "sink" + i; document.body.append(sink);
  sent.push(new Promise(answered => sink.onload = answered));
  document.getElementById(form).submit();
});
Promise.all(sent).then(() => document.title = "sent");
</script></body></html>""")


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[str]:
    """`server` answering from a thread of this process until the block ends; yields its URL."""
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def attacker_site(target: str, answers: dict[str, str]) -> Iterator[str]:
    """A second local server (another 127.0.0.1 port, so another origin) serving ATTACKER_PAGE."""
    body = json.dumps(answers)
    key, label = next(iter(answers.items()))
    html = ATTACKER_PAGE.substitute(target=target.rstrip("/"), answers=body, answers_but_last=body[:-1],
                                    key=key, label=label).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


def test_another_sites_page_saves_nothing_and_the_page_still_does(tmp_path, browser, capsys):
    """Issue 24, case 2, in a real browser: the attacker's requests reach the server and are refused
    (one log line each), progress.json stays byte-identical and no labels file appears; the
    real page in the same browser then finishes the round. A class name written as HTML shows as
    text and runs nothing. (The server runs in this process: the CLI is the other tests' part.)"""
    out = str(tmp_path / "label")
    classes = ["cat", '<img src=x onerror="document.title=`xss`">']
    keys = ["k0", "k1", "k2"]
    images = {k: torch.full((1, 8, 8), 9 * i, dtype=torch.uint8) for i, k in enumerate(keys)}
    with pytest.raises(WaitingForLabels):
        ManualAnnotator(out, classes, images.__getitem__).annotate(1, keys)
    server, labels_written = make_server(out, 1, 0)
    context = browser.new_context()

    with serving(server) as url, attacker_site(url, dict.fromkeys(keys, classes[1])) as attacker_url:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("button.cls")
        assert page.locator("button.cls").nth(1).inner_text() == f"2 {classes[1]}" and page.title() != "xss"
        page.keyboard.press("1")  # k0 -> cat, saved as progress
        page.wait_for_function("document.getElementById('status').textContent.includes('1 answers')")
        saved = store.read_bytes(progress_uri(out, 1))

        attacker = context.new_page()
        attacker.goto(attacker_url)
        attacker.wait_for_function("document.title === 'sent'")
        assert store.read_bytes(progress_uri(out, 1)) == saved and not store.exists(labels_uri(out, 1))
        # every request reached the server and was refused for its origin (the attacker's page sees no
        # answer: Cross-Origin-Resource-Policy blocks the fetched ones, X-Frame-Options the framed ones)
        refused = capsys.readouterr().err.splitlines()
        assert len(refused) == 4 and all(line.startswith("refused POST") and
                                         f"Origin '{attacker_url[:-1]}' is not this page" in line
                                         for line in refused), refused

        page.keyboard.press("2")  # k1 -> the HTML-named class
        page.keyboard.press("?")  # k2 -> not sure: the round is complete
        page.wait_for_selector("#status:has-text('saved')")
        assert labels_written.wait(10)  # set just after the answer is sent
    context.close()
    assert list(csv.reader(io.StringIO(store.read_text(labels_uri(out, 1))))) == [
        ["key", "label"], ["k0", "cat"], ["k1", classes[1]], ["k2", "?"]]


def test_nothing_waiting_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unsupft", "annotate", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2 and "no round waits for labels" in result.stderr
