"""Annotators: the oracle, and the manual exchange through the store (request, answer, validation)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from unsupft import store
from unsupft.errors import UserError
from unsupft.select.annotators import (
    ManualAnnotator,
    OracleAnnotator,
    WaitingForLabels,
    labels_uri,
    parse_labels,
    read_requested_keys,
)

CLASSES = ["cat", "dog", "bird"]


def images(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 256, (1, 8, 8), generator=g, dtype=torch.uint8) for k in keys}


def test_oracle_answers_from_the_shards():
    oracle = OracleAnnotator(["a", "b", "c"], torch.tensor([2, 0, 1]))
    assert oracle.annotate(0, ["c", "a"]) == {"c": 1, "a": 2}
    with pytest.raises(UserError, match="labeled data set"):
        OracleAnnotator(["a"], None)


def test_manual_round_waits_then_reads_the_answer(store_uri):
    out = store.join(store_uri, "label")
    imgs = images(["k1", "k2", "k3"])
    manual = ManualAnnotator(out, CLASSES, imgs.__getitem__)
    with pytest.raises(WaitingForLabels) as waiting:
        manual.annotate(2, ["k3", "k1"])
    assert f"put {out}/labels/round-2.csv" in str(waiting.value)
    assert f"unsupft annotate {out}" in str(waiting.value)
    assert read_requested_keys(out, 2) == ["k3", "k1"]
    assert json.loads(store.read_text(f"{out}/requests/classes.json")) == CLASSES
    from PIL import Image
    import numpy as np

    png = Image.open(io.BytesIO(store.read_bytes(f"{out}/requests/round-2/k3.png")))
    assert np.array_equal(np.array(png), imgs["k3"][0].numpy())
    store.write_text(labels_uri(out, 2), "key,label\nk1,bird\nk3,cat\n")
    assert manual.annotate(2, ["k3", "k1"]) == {"k1": 2, "k3": 0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("key,label\nk1,cat\nzz,dog\n", "line 3: unknown key 'zz'"),
        ("key,label\nk1,cat\nk2,horse\n", "line 3: unknown class 'horse'"),
        ("key,label\nk1,cat\nk1,dog\nk2,dog\n", "line 3: duplicate key 'k1'"),
        ("key,label\nk1,cat\n", "missing keys k2"),
        ("id,class\nk1,cat\nk2,dog\n", "line 1: header must be 'key,label'"),
        ("key,label\nk1\n", "line 2: expected key,label"),
    ],
)
def test_bad_answers_are_rejected_naming_the_line(tmp_path, text, message):
    out = str(tmp_path / "label")
    manual = ManualAnnotator(out, CLASSES, images(["k1", "k2"]).__getitem__)
    store.write_text(labels_uri(out, 0), text)
    with pytest.raises(UserError, match=message) as err:
        manual.annotate(0, ["k1", "k2"])
    assert "\n" not in str(err.value) and labels_uri(out, 0) in str(err.value)


def test_not_sure_answers_count_as_answered_but_carry_no_label():
    text = "key,label\nk1,b\nk2,?\n"
    assert parse_labels(text, "f.csv", ["k1", "k2"], ["a", "b"]) == {"k1": 1}
    with pytest.raises(UserError, match="line 3: duplicate key 'k1'"):
        parse_labels("key,label\nk1,?\nk1,a\n", "f.csv", ["k1"], ["a", "b"])
    with pytest.raises(UserError, match="missing keys k2"):
        parse_labels("key,label\nk1,?\n", "f.csv", ["k1", "k2"], ["a", "b"])
