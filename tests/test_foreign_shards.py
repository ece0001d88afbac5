"""Stages on shards unsupft did not write: plain `webdataset.ShardWriter` (jpg + cls) and
img2dataset-style (jpg + txt + json) shards, named by a brace pattern, a folder or a prefix, on
file and S3 (SeaweedFS), used by `pretrain`, `adapt` (with replay), `transfer` and `evaluate`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sklearn.datasets import load_digits

from unsupft import store
from unsupft.models import load_backbone

ROOT = str(Path(__file__).resolve().parents[1])
SMALL = ["--batch-size", "16", "--queue-size", "32", "--workers", "0", "--key-momentum", "0.99"]


def unsupft(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> Path:
    """sw/train-000{0..3}.tar (160 grayscale digits, jpg + cls), sw-test/test-0000.tar (60), and
    i2d/0000{0,1}.tar (40 colour images, jpg + txt + json without a label)."""
    root = tmp_path_factory.mktemp("foreign")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    for folder in ("sw", "sw-test", "i2d"):
        (root / folder).mkdir()
    with wds.ShardWriter(str(root / "sw" / "train-%04d.tar"), maxcount=40, verbose=0) as sink:
        for i in range(160):
            sink.write({"__key__": f"d{i:05d}", "jpg": images[i], "cls": int(digits.target[i])})
    with wds.ShardWriter(str(root / "sw-test" / "test-%04d.tar"), maxcount=100, verbose=0) as sink:
        for i in range(160, 220):
            sink.write({"__key__": f"d{i:05d}", "jpg": images[i], "cls": int(digits.target[i])})
    with wds.ShardWriter(str(root / "i2d" / "%05d.tar"), maxcount=20, verbose=0) as sink:
        for i in range(40):
            sink.write({"__key__": f"{i:09d}", "jpg": np.repeat(images[i][:, :, None], 3, axis=2),
                        "txt": f"a digit, photo {i}", "json": {"url": f"https://example.invalid/{i}.jpg"}})
    return root


@pytest.fixture(params=["file", "s3"])
def shards(request, local_shards: Path) -> str:
    """The shards' root: the local folder, or a copy under a fresh S3 prefix."""
    if request.param == "file":
        return str(local_shards)
    uri = request.getfixturevalue("s3_uri")
    store.copy_prefix(str(local_shards), uri)
    return uri


def test_pretrain_adapt_transfer_evaluate_on_foreign_shards(shards: str, tmp_path: Path) -> None:
    train = f"{shards}/sw/train-{{0000..0003}}.tar"
    test = f"{shards}/sw-test"
    base = tmp_path / "base"
    unsupft("pretrain", "--data", train, "--image-size", 8, "--out", base, "--steps", 2, *SMALL)
    _, meta = load_backbone(str(base))
    assert meta["in_channels"] == 1 and meta["image_size"] == [8, 8]
    assert json.loads((base / "config.json").read_text())["resolved"]["samples_per_epoch"] == 160

    adapted = tmp_path / "adapted"
    unsupft("adapt", "--init", base, "--target", test, "--replay-source", train, "--replay-fraction", 0.25,
            "--image-size", 8, "--out", adapted, "--steps", 2, *SMALL)
    config = json.loads((adapted / "config.json").read_text())
    assert config["resolved"]["replayed_images"] == 40 and config["resolved"]["samples_per_epoch"] == 60 + 40

    colour = tmp_path / "colour"  # img2dataset-style: unlabeled colour images, a prefix of tars
    unsupft("pretrain", "--data", f"{shards}/i2d", "--image-size", 8, "--out", colour, "--steps", 2, *SMALL)
    assert load_backbone(str(colour))[1]["in_channels"] == 3

    transferred = tmp_path / "transfer"
    unsupft("transfer", "--init", adapted, "--train", train, "--shots", 2, "--epochs", 2, "--out", transferred)
    keys = (transferred / "train_keys.txt").read_text().split()
    assert len(keys) == 20 and all(k.startswith("d") for k in keys)  # 2 shots x the 10 label ids found

    report = tmp_path / "report"
    unsupft("evaluate", "--model", f"adapted={adapted}", "--train", train, "--test", test, "--shots", 1,
            "--trials", 1, "--epochs", 2, "--metrics", "fewshot,retrieval,linear", "--out", report)
    result = json.loads((report / "report.json").read_text())
    assert result["classes"] == [str(c) for c in range(10)]
    assert 0.0 <= result["models"]["adapted"]["retrieval_top5"] <= 1.0


def test_mixed_size_shards_need_an_image_size(local_shards: Path, tmp_path: Path) -> None:
    proc = unsupft("pretrain", "--data", local_shards / "sw", "--out", tmp_path / "out", "--steps", 1, *SMALL,
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "give --image-size" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case,message", [
    ("missing-shard", "the pattern names .*train-0004.tar, which does not exist"),
    ("no-tars", "incomplete data set"),
    ("no-image", "has no image member"),
    ("broken-image", "'bad': not a decodable image"),
])
def test_bad_shards_are_one_line_exit_2_nothing_written(local_shards: Path, tmp_path: Path, case: str,
                                                        message: str) -> None:
    data = {"missing-shard": f"{local_shards}/sw/train-{{0000..0009}}.tar", "no-tars": str(tmp_path)}.get(case)
    if case in ("no-image", "broken-image"):
        data = str(tmp_path / "t.tar")
        with wds.TarWriter(data) as sink:
            sink.write({"__key__": "good", "jpg": np.zeros((8, 8), np.uint8)})
            sink.write({"__key__": "bad", "txt": "no image"} if case == "no-image" else
                       {"__key__": "bad", "jpg": b"\xff\xd8 not a jpeg at all"})
            sink.write({"__key__": "late", "jpg": np.zeros((8, 8), np.uint8)})
    out = tmp_path / "out"
    proc = unsupft("pretrain", "--data", data, "--image-size", 8, "--out", out, "--steps", 2, *SMALL, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(message, proc.stderr) and proc.stderr.startswith("error: ")
    assert not out.exists()
