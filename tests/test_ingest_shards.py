"""`unsupft ingest` of WebDataset shards (foreign ones and unsupft data sets), file and S3: the new
data set's image members are the source's very bytes, with the right labels and classes, and both
`webdataset` and the stages read it."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from unsupft import store
from unsupft.stages.ingest import ingest_command
from tests.test_foreign_shards import SMALL, local_shards, shards, unsupft  # noqa: F401  (fixtures)


def members(uri: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every member of the shards under `uri` (a data set or a pattern/
    folder of tars), read with plain tarfile through the store (file or S3)."""
    if store.exists(store.join(uri, "dataset.json")):
        names = [s["name"] for s in store.read_json(store.join(uri, "dataset.json"))["shards"]]
        uris = [store.join(uri, n) for n in names]
    else:
        uris = [store.join(uri, n) for n in sorted(store.list_prefix(uri)) if n.endswith(".tar")]
    found: dict[str, dict[str, bytes]] = {}
    for shard in uris:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(shard))) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


def manifest(uri: str) -> dict:
    return store.read_json(store.join(uri, "dataset.json"))


def run_ingest(*args) -> None:
    result = CliRunner().invoke(ingest_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_foreign_shards_copied_byte_identical(shards: str, tmp_path: Path) -> None:
    out = f"{shards}/ingested" if store.is_s3(shards) else str(tmp_path / "ingested")
    run_ingest(f"{shards}/sw/train-{{0000..0003}}.tar", f"{out}/sw", "--shard-size", 50)
    source, copied = members(f"{shards}/sw"), members(f"{out}/sw")
    assert sorted(copied) == sorted(source) and len(copied) == 160
    for key, member in copied.items():
        assert member["jpg"] == source[key]["jpg"]  # the very bytes, not a re-encode
        assert member["cls"] == source[key]["cls"]  # label ids 0..9 all present: classes "0".."9" keep them
    info = manifest(f"{out}/sw")
    assert info["classes"] == [str(c) for c in range(10)] and info["labeled"] and info["channels"] == 1
    assert info["image_size"] == [8, 8] and [s["samples"] for s in info["shards"]] == [50, 50, 50, 10]

    run_ingest(f"{shards}/i2d", f"{out}/i2d")  # img2dataset-style: a prefix of tars, jpg + txt + json, no label
    source, copied = members(f"{shards}/i2d"), members(f"{out}/i2d")
    assert sorted(copied) == sorted(source) and all(set(m) == {"jpg"} for m in copied.values())
    assert all(copied[k]["jpg"] == source[k]["jpg"] for k in copied)
    info = manifest(f"{out}/i2d")
    assert not info["labeled"] and info["classes"] == [] and info["channels"] == 3


def test_single_tar_with_classes_limit_split(local_shards: Path, tmp_path: Path) -> None:
    source = members(str(local_shards / "sw"))
    labels = {k: int(m["cls"]) for k, m in source.items()}
    args = [local_shards / "sw" / "train-0000.tar", tmp_path / "a", "--classes", "3,7", "--split", 0.25, "--seed", 5]
    run_ingest(*args)
    first = {part: members(str(tmp_path / "a" / part)) for part in ("train", "test")}
    kept = {k for k in list(source)[:40] if labels[k] in (3, 7)}
    assert set(first["train"]) | set(first["test"]) == kept and not set(first["train"]) & set(first["test"])
    assert first["test"] and manifest(str(tmp_path / "a" / "test"))["classes"] == ["3", "7"]
    for part in first.values():
        for key, member in part.items():
            assert member["jpg"] == source[key]["jpg"] and int(member["cls"]) == [3, 7].index(labels[key])

    run_ingest(local_shards / "sw", tmp_path / "b", "--limit", 25, "--seed", 1, "--unlabeled")
    limited = members(str(tmp_path / "b"))
    assert len(limited) == 25 and set(limited) <= set(source) and all(set(m) == {"jpg"} for m in limited.values())
    run_ingest(local_shards / "sw", tmp_path / "c", "--limit", 25, "--seed", 1, "--unlabeled")
    assert members(str(tmp_path / "c")) == limited  # the seed alone decides the subset and its order


def test_unsupft_data_set_as_source_keeps_names(store_uri: str, tmp_path: Path) -> None:
    run_ingest("sklearn:digits", f"{store_uri}/digits", "--limit", 200)
    run_ingest(f"{store_uri}/digits", f"{store_uri}/two", "--classes", "4,9")
    source, copied = members(f"{store_uri}/digits"), members(f"{store_uri}/two")
    assert copied and set(copied) == {k for k, m in source.items() if int(m["cls"]) in (4, 9)}
    assert all(m["png"] == source[k]["png"] and int(m["cls"]) == [4, 9].index(int(source[k]["cls"]))
               for k, m in copied.items())
    info = manifest(f"{store_uri}/two")
    assert info["classes"] == ["4", "9"] and info["image_size"] == [8, 8]
    assert info["source"].startswith(f"{store_uri}/digits --classes 4,9")


def test_mixed_sizes_null_and_format_reencodes(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for i, size in enumerate([(8, 8), (12, 10), (8, 8)]):
            pixels = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
            sink.write({"__key__": f"m{i}", "png": pixels, "cls": i % 2})
    run_ingest(tmp_path / "mixed.tar", tmp_path / "out")
    assert manifest(str(tmp_path / "out"))["image_size"] is None

    run_ingest(tmp_path / "mixed.tar", tmp_path / "webp", "--format", "webp", "--quality", 100)
    source, copied = members(str(tmp_path)), members(str(tmp_path / "webp"))
    for key, member in copied.items():
        assert set(member) == {"webp", "cls"}
        pixels = np.asarray(Image.open(io.BytesIO(member["webp"])).convert("RGB"))
        assert pixels.shape == np.asarray(Image.open(io.BytesIO(source[key]["png"]))).shape


def test_webdataset_and_pretrain_read_the_ingested_set(local_shards: Path, tmp_path: Path) -> None:
    run_ingest(f"{local_shards}/sw/train-{{0000..0003}}.tar", tmp_path / "set", "--shard-size", 64)
    urls = [str(tmp_path / "set" / s["name"]) for s in manifest(str(tmp_path / "set"))["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l8"))
    assert len(samples) == 160 and all(s["jpg"].shape == (8, 8) and 0 <= s["cls"] <= 9 for s in samples)
    run = tmp_path / "run"
    unsupft("pretrain", "--data", tmp_path / "set", "--out", run, "--steps", 2, *SMALL)  # image_size from the manifest
    assert json.loads((run / "config.json").read_text())["resolved"]["samples_per_epoch"] == 160


@pytest.mark.parametrize("case,message", [
    ("missing-shard", r"the pattern names .*train-0004\.tar, which does not exist"),
    ("no-tars", "incomplete data set"),
    ("labels", "--labels is for IDX image files only"),
])
def test_bad_shard_sources_one_line_nothing_written(local_shards: Path, s3_uri: str, tmp_path: Path, case: str,
                                                    message: str) -> None:
    source = {"missing-shard": f"{local_shards}/sw/train-{{0000..0004}}.tar", "no-tars": f"{s3_uri}/empty",
              "labels": str(local_shards / "sw")}[case]
    if case == "no-tars":
        store.write_text(f"{s3_uri}/empty/readme.txt", "no shards here")
    extra = ["--labels", str(local_shards / "sw" / "train-0000.tar")] if case == "labels" else []
    out = tmp_path / "out"
    result = CliRunner().invoke(ingest_command, [source, str(out), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), lines
    assert not out.exists()
