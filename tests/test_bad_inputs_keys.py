"""Issue 24, beside the bad-input corpus (tests/test_bad_inputs.py): sample keys and member names
are data, never paths, and the shard folders unsupft writes are known by its marker, not by names.

- case 1: a foreign tar's keys (`../../../../victim/k0`, `/abs/...`, backslashes, control
  characters, 300 characters, bytes that are not UTF-8) neither make `label --annotator manual`
  write outside `--out` (file and S3) nor reach an ingested shard as unsafe member names;
- case 8: 200-character member names (PAX tars) ingest and read back;
- case 12: a key that appears twice is one line in a stage, and `ingest` makes keys unique;
- case 13: `webdataset.ShardWriter`'s own `shard-%06d.tar` folders read as foreign shards, while
  unfinished ingestions (marker, or old leftovers without one) are still refused;
- case 5: a split ingestion on a really full disk (a tmpfs) leaves nothing that blocks its rerun.

Everything runs through the real CLIs (Click's runner) on real tars, images and file systems.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner, Result
from PIL import Image
from sklearn.datasets import load_digits

from tests.test_bad_inputs import _tree
from unsupft import store
from unsupft.cli import main as unsupft_main
from unsupft.data.index import open_index
from unsupft.errors import EXIT_INFRA, EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS
from unsupft.select.annotators import csv_text, image_uri, labels_uri, read_request

# Keys a hostile or careless supplier's tar carries (one sample each, classes 0, 1, 2 in turn). The
# stages see `caf\udce9` (the byte 0xE9, not UTF-8) as `caf\xe9`. (A name whose file part starts with a
# dot, `..\\x\\k.png`, is no sample for WebDataset, nor for the stages: its rule needs a key before the dot.)
HOSTILE = ["../../../../victim/k0", "/abs/victim/k1", "a//b/k2", "./c/k3", "back\\slash\\k4", "x" * 300,
           "new\nline6", "ünïcödé7", "tab\tk8", "caf\udce9", "sp ace10", "plain11"]
LONG = ["d" * 50 + "/" + "k" * 149, "n" * 200, "m" * 199]  # 200-character member names and more


def _digit_png(i: int) -> bytes:
    """Digit i of scikit-learn's set as an 8x8 PNG: every sample its own image bytes."""
    digits = load_digits()
    buffer = io.BytesIO()
    Image.fromarray(np.round(digits.images[i] * (255 / 16)).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pax_tar(path: Path, keys: list[str], first: int = 0) -> None:
    """A PAX tar (what `tarfile` and `webdataset` write by default) of `<key>.png` + `<key>.cls`,
    names of any length and bytes (surrogates are written as the raw bytes they stand for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for n, key in enumerate(keys):
            for ext, data in (("png", _digit_png(first + n)), ("cls", str((first + n) % 3).encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hostile tar, long names, repeated keys across and inside shards, a ShardWriter folder
    named `shard-%06d.tar`, and a tiny model; shared by every test (and never written to)."""
    from unsupft.models import build_backbone, save_model

    root = tmp_path_factory.mktemp("keys")
    _pax_tar(root / "hostile.tar", HOSTILE)
    _pax_tar(root / "long.tar", LONG)
    _pax_tar(root / "dups" / "part-0.tar", ["a", "b", "c"])
    _pax_tar(root / "dups" / "part-1.tar", ["a", "d", "e", "d"], first=3)  # `a` again, `d` twice, not adjacent
    (root / "sw").mkdir()
    digits = load_digits()
    with wds.ShardWriter(str(root / "sw" / "shard-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(30):
            sink.write({"__key__": f"s{i:04d}", "png": np.round(digits.images[i] * (255 / 16)).astype(np.uint8),
                        "cls": int(digits.target[i])})
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    return {"root": root, "hostile": root / "hostile.tar", "long": root / "long.tar", "dups": root / "dups",
            "sw": root / "sw", "init": root / "init"}


def safe_member(name: str) -> bool:
    """Whether a member name stays inside the folder it is extracted to, on every system."""
    parts = name.split("/")
    return (not name.startswith("/") and "\\" not in name and not any(ord(c) < 32 or ord(c) == 127 for c in name)
            and all(part not in ("", ".", "..") and len(part.encode()) <= 255 for part in parts))


def run(*args: object) -> Result:
    """One `unsupft` command in this process, as a user types it."""
    return CliRunner().invoke(unsupft_main, [str(a) for a in args])


def errors_of(result: Result) -> list[str]:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def one_error(result: Result, code: int, needle: str) -> str:
    """The result's only `error:` line, checked to carry `needle` after exit code `code`."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = errors_of(result)
    assert len(lines) == 1 and needle in lines[0], result.output
    return lines[0]


def shard_members(uri: str) -> list[str]:
    """Every member name of the shards `dataset.json` lists under `uri`, read with plain tarfile."""
    names = []
    for shard in store.read_json(store.join(uri, "dataset.json"))["shards"]:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(store.join(uri, shard["name"])))) as tar:
            names += tar.getnames()
    return names


def images_by_key(uri: str) -> dict[str, bytes]:
    """{key: image bytes} of a data set, as the stages index it."""
    index = open_index(uri)
    shard_bytes = [store.read_bytes(u) for u in index.shard_uris]
    return {index.key(i): shard_bytes[int(index.shard[i])][int(index.offset[i]):int(index.offset[i] + index.size[i])]
            for i in range(len(index))}


# -- case 1: keys never become paths outside the output ------------------------------------------


@contextlib.contextmanager
def annotate_server(out: str) -> Iterator[str]:
    """`unsupft annotate`'s server for round 0 of `out` on a free port; its base URL."""
    from unsupft.select.annotate_web import make_server

    server, _ = make_server(out, 0, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_label_manual_keeps_hostile_keys_inside_out(inputs: dict[str, Path], store_uri: str, tmp_path: Path) -> None:
    stage_keys = open_index(str(inputs["hostile"])).keys()
    initial = tmp_path / "initial.csv"  # every key asked in round 0, so each hostile form is written
    initial.write_text(csv_text(["key"], ([k] for k in stage_keys)))
    root = store_uri if store.is_s3(store_uri) else str(tmp_path / "store")
    out = store.join(root, "a", "b", "o")  # `../../../../victim` from its round folder is `a/victim`
    before = _tree(tmp_path, inputs["root"])

    result = run("label", "--init", inputs["init"], "--data", inputs["hostile"], "--annotator", "manual",
                 "--initial", initial, "--budget", 0, "--epochs", 1, "--out", out)
    assert result.exit_code == EXIT_WAITING_FOR_LABELS, result.output
    assert errors_of(result) == [] and "waiting for labels" in result.output

    names = store.list_prefix(root)  # everything written, relative to the store root (file or S3)
    assert all(n.startswith("a/b/o/") and not {"", ".", ".."} & set(n.split("/")) for n in names), names
    outside = {p: h for p, h in _tree(tmp_path, inputs["root"]).items() if not p.startswith(str(tmp_path / "store"))}
    assert outside == {k: v for k, v in before.items() if not k.startswith(str(tmp_path / "store"))}
    keys, _ = read_request(out, 0)
    assert sorted(keys) == sorted(stage_keys)
    rows = list(csv.DictReader(io.StringIO(store.read_text(store.join(out, "requests", "round-0.csv")))))
    image_of = {r["key"]: r["image"] for r in rows}  # a person finds each key's file
    assert sorted(image_of) == sorted(keys) and len(set(image_of.values())) == len(keys)
    assert image_of["plain11"] == "plain11.png"  # a plain key names its own file
    images = [n for n in names if n.startswith("a/b/o/requests/round-0/")]
    assert sorted(images) == sorted(f"a/b/o/requests/round-0/{image_of[k]}" for k in keys)
    assert all(image_uri(out, 0, k) == store.join(out, "requests", "round-0", image_of[k]) for k in keys)

    with annotate_server(out) as url:  # the page finds every image by its key
        task = json.load(urllib.request.urlopen(f"{url}/task"))  # the page's server on 127.0.0.1
        assert task["keys"] == keys
        for key in keys:
            with urllib.request.urlopen(f"{url}/img/{quote(key, safe='')}") as response:  # 127.0.0.1
                assert response.read() == store.read_bytes(image_uri(out, 0, key))

    classes = open_index(str(inputs["hostile"])).classes
    answers = csv_text(["key", "label"], ([k, classes[i % 3]] for i, k in enumerate(keys)))
    store.write_text(labels_uri(out, 0), answers)
    resumed = run("label", "--resume", "--out", out)
    assert resumed.exit_code == 0 and errors_of(resumed) == [], resumed.output
    assert store.exists(store.join(out, "_DONE.json"))
    assert all(n.startswith("a/b/o/") for n in store.list_prefix(root))


def test_ingest_rewrites_unsafe_member_names(inputs: dict[str, Path], tmp_path: Path) -> None:
    out, split = tmp_path / "o" / "out", tmp_path / "o" / "split"
    before = _tree(tmp_path, inputs["root"])
    result = run("ingest", inputs["hostile"], out)
    assert result.exit_code == 0 and errors_of(result) == [], result.output
    rewritten = [line for line in result.output.splitlines() if "rewrote" in line]
    assert len(rewritten) == 1 and "rewrote 9 sample keys" in rewritten[0], result.output
    assert {p: h for p, h in _tree(tmp_path, inputs["root"]).items() if not p.startswith(str(out))} == {
        **before, str(tmp_path / "o"): "dir"}  # nothing written outside OUT_URI
    members = shard_members(str(out))
    assert all(safe_member(m) for m in members), members
    extracted = tmp_path / "extracted"
    for shard in out.glob("shard-*.tar"):  # every tar tool extracts them inside their folder
        with tarfile.open(shard) as tar:
            tar.extractall(extracted, filter="data")
        if shutil.which("tar"):
            proc = subprocess.run(["tar", "-xf", str(shard), "-C", str(extracted)], capture_output=True, text=True)
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extracted", "o"]

    source = images_by_key(str(inputs["hostile"]))
    copied = images_by_key(str(out))
    with open(out / "sources.tsv", newline="") as f:  # each rewritten key with its key in SOURCE
        original = dict(csv.reader(f, delimiter="\t"))
    assert len(original) == 9 and "victim/k0" in original and original["victim/k0"] == "../../../../victim/k0"
    assert {original.get(k, k): v for k, v in copied.items()} == source  # the same images, every key unique
    # deterministic: a split of the same source gives every sample the same key
    assert run("ingest", inputs["hostile"], split, "--split", "0.5").exit_code == 0
    assert {**images_by_key(str(split / "train")), **images_by_key(str(split / "test"))} == copied


# -- case 8: long member names -----------------------------------------------------------------------


def test_ingest_keeps_200_character_member_names(inputs: dict[str, Path], tmp_path: Path) -> None:
    result = run("ingest", inputs["long"], tmp_path / "out")
    assert result.exit_code == 0 and errors_of(result) == [] and "rewrote" not in result.output, result.output
    assert sorted(images_by_key(str(tmp_path / "out"))) == sorted(LONG)
    shard = str(next((tmp_path / "out").glob("shard-*.tar")))
    assert sorted(sample["__key__"] for sample in wds.WebDataset(shard, shardshuffle=False)) == sorted(LONG)
    assert images_by_key(str(tmp_path / "out")) == images_by_key(str(inputs["long"]))


# -- case 12: repeated keys ----------------------------------------------------------------------------


def test_repeated_keys_refused_by_stages_made_unique_by_ingest(inputs: dict[str, Path], tmp_path: Path) -> None:
    before = _tree(tmp_path, inputs["root"])
    refused = run("pretrain", "--data", inputs["dups"], "--out", tmp_path / "o", "--image-size", 8, "--steps", 1)
    line = one_error(refused, EXIT_USER_ERROR, "sample key 'a' appears twice")
    assert "part-0.tar and" in line and "part-1.tar" in line
    assert _tree(tmp_path, inputs["root"]) == before  # nothing written

    result = run("ingest", inputs["dups"], tmp_path / "out")
    assert result.exit_code == 0 and errors_of(result) == [], result.output
    assert "rewrote 2 sample keys" in result.output and "it appears twice" in result.output
    keys = open_index(str(tmp_path / "out")).keys()  # the stages take it: keys unique
    assert sorted(keys) == ["a", "a~2", "b", "c", "d", "d~2", "e"]


# -- case 13: foreign shard-NNNNNN.tar folders, and unfinished ingestions --------------------------


def test_shardwriter_folder_reads_as_foreign_shards(inputs: dict[str, Path], tmp_path: Path) -> None:
    result = run("ingest", inputs["sw"], tmp_path / "out")
    assert result.exit_code == 0 and errors_of(result) == [], result.output
    assert store.read_json(str(tmp_path / "out" / "dataset.json"))["samples"] == 30

    # ingesting into it would overwrite and delete the user's shards: refused, nothing changed
    theirs = tmp_path / "theirs"
    shutil.copytree(inputs["sw"], theirs)
    before = _tree(tmp_path)
    refused = run("ingest", "sklearn:digits", theirs, "--limit", 20)
    one_error(refused, EXIT_USER_ERROR, "shard-000000.tar, which unsupft did not write")
    assert _tree(tmp_path) == before


def test_unfinished_ingestions_still_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    # what an ingestion killed before unsupft wrote markers left: its shards without dataset.json
    old = tmp_path / "old"
    assert run("ingest", "sklearn:digits", old, "--limit", 20, "--shard-size", 10).exit_code == 0
    (old / "dataset.json").unlink()
    before = _tree(tmp_path)
    one_error(run("ingest", old, tmp_path / "copy"), EXIT_USER_ERROR, "incomplete data set")
    assert _tree(tmp_path) == before
    rerun = run("ingest", "sklearn:digits", old, "--limit", 20, "--shard-size", 10)  # the rerun finishes it
    assert rerun.exit_code == 0 and errors_of(rerun) == [], rerun.output
    assert sorted(p.name for p in old.iterdir()) == ["dataset.json", "shard-000000.tar", "shard-000001.tar"]
    # a marker (what a kill leaves, tests/test_ingest.py) refuses the folder and anything above it
    (old / "dataset.json").unlink()
    (old / "_INGESTING.json").write_text("{}")
    before = _tree(tmp_path)
    one_error(run("ingest", old, tmp_path / "copy"), EXIT_USER_ERROR, "unfinished ingestion (_INGESTING.json")
    one_error(run("pretrain", "--data", tmp_path, "--out", tmp_path / "p", "--image-size", 8), EXIT_USER_ERROR,
              "unfinished ingestion (old/_INGESTING.json")
    assert _tree(tmp_path) == before


# -- case 5: a full disk in a split ingestion ---------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`mount(bytes)`: a real file system of that size at one folder (a tmpfs; mounted again at the
    new size when called again), unmounted at the end. Skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        options = f"{'remount,' if mounted else ''}size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
        mounted.append(size)
        return disk

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


PAGE = os.sysconf("SC_PAGE_SIZE")  # what a tmpfs counts: every file takes whole pages
SPLIT = ["--limit", 400, "--split", 0.5, "--shard-size", 1000]  # one shard per part


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


def _samples(split: Path) -> list[int]:
    """The sample counts of a split's complete parts."""
    return [store.read_json(str(split / part / "dataset.json"))["samples"] for part in ("train", "test")]


def test_full_disk_split_ingestion_is_rerunnable(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"  # the same ingestion where space is plenty: how large its parts are
    assert run("ingest", "sklearn:digits", scratch, *SPLIT).exit_code == 0
    train, test = (_pages(next((scratch / part).glob("shard-*.tar"))) for part in ("train", "test"))
    markers = 2

    # the disk fills while test/'s shard is written: nothing is left that blocks the rerun
    disk = tmpfs((markers + train + test // 2) * PAGE)
    (disk / "notes.txt").write_text("the user's own file")
    result = run("ingest", "sklearn:digits", disk / "d", *SPLIT)
    one_error(result, EXIT_INFRA, "no space left")
    assert [p for p in (disk / "d").rglob("*") if p.is_file()] == []  # no part complete, no shard left
    tmpfs(64 * PAGE + (train + test) * PAGE)
    rerun = run("ingest", "sklearn:digits", disk / "d", *SPLIT)
    assert rerun.exit_code == 0 and errors_of(rerun) == [], rerun.output
    assert _samples(disk / "d") == _samples(scratch)
    assert (disk / "notes.txt").read_text() == "the user's own file"


def test_full_disk_between_the_two_manifests(tmpfs: Callable[[int], Path], tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    assert run("ingest", "sklearn:digits", scratch, *SPLIT).exit_code == 0
    train, test = (_pages(next((scratch / part).glob("shard-*.tar"))) for part in ("train", "test"))

    # room for both markers and shards and train/'s manifest, not test/'s: train/ is complete alone
    disk = tmpfs((2 + train + test + 1) * PAGE)
    one_error(run("ingest", "sklearn:digits", disk / "d", *SPLIT), EXIT_INFRA, "no space left")
    assert (disk / "d" / "train" / "dataset.json").exists() and not (disk / "d" / "test" / "dataset.json").exists()
    one_error(run("pretrain", "--data", disk / "d" / "test", "--out", tmp_path / "p", "--image-size", 8),
              EXIT_USER_ERROR, "unfinished ingestion")
    tmpfs(64 * PAGE + 2 * (train + test) * PAGE)
    rerun = run("ingest", "sklearn:digits", disk / "d", *SPLIT)  # no --overwrite: it finishes what it began
    assert rerun.exit_code == 0 and errors_of(rerun) == [], rerun.output
    assert "did not finish; writing it again" in rerun.output
    assert _samples(disk / "d") == _samples(scratch)
    for part in ("train", "test"):  # the first run's train/ shard replaced, no marker left
        names = sorted(p.name for p in (disk / "d" / part).iterdir())
        assert names[0] == "dataset.json" and len(names) == 2 and names[1].startswith("shard-"), names


def test_overwrite_deletes_only_the_files_unsupft_wrote(tmp_path: Path) -> None:
    """A complete set with a user's file of a shard name beside it: `--overwrite` replaces the set's
    own shards (those its manifest lists) and keeps the user's file, bytes and all."""
    out = tmp_path / "d"
    assert run("ingest", "sklearn:digits", out, "--limit", "30", "--shard-size", "10").exit_code == 0
    old = sorted(p.name for p in out.glob("shard-*.tar"))
    (out / "shard-000009.tar").write_bytes(b"the user's own file")
    result = run("ingest", "sklearn:digits", out, "--limit", "20", "--shard-size", "10", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "shard-000009.tar").read_bytes() == b"the user's own file"
    assert not any((out / name).exists() for name in old)  # the old set's shards are gone
    assert json.loads((out / "dataset.json").read_text())["samples"] == 20
    assert not (out / "_INGESTING.json").exists()
