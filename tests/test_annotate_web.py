"""`unsupft annotate` driven in a real headless browser (Debian's chromium through playwright)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from unsupft import store
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


@contextlib.contextmanager
def annotate_page(run: Path) -> Iterator[tuple[Any, subprocess.Popen]]:
    """`unsupft annotate RUN` in its own process, and its page open in headless chromium."""
    sync_api = pytest.importorskip("playwright.sync_api")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unsupft", "annotate", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        assert "open http://127.0.0.1:" in line, line + proc.stderr.read()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(line.split("open ")[1].strip())
            yield page, proc
            browser.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_label_a_round_in_the_browser(tmp_path):
    run = tmp_path / "run"
    out = str(run / "stages" / "label")
    keys = ["img-a", "img-b", "img-c", "img-d"]
    waiting_round(out, keys)

    with annotate_page(run) as (page, proc):
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


def test_digit_keys_guesses_unsure_grid_and_saved_progress(tmp_path):
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

    with annotate_page(run) as (page, proc):
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

    with annotate_page(run) as (page, proc):  # a new server and page carry on where the person stopped
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


def test_nothing_waiting_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "unsupft", "annotate", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2 and "no round waits for labels" in result.stderr
