"""`unsupft.data.stream` / `load_arrays`: splitting, shuffling, S3 streaming, refusing bad data."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from unsupft.data import load_arrays, read_info, stream
from unsupft.errors import UserError




@pytest.fixture(scope="module")
def digits(tmp_path_factory, ingest) -> str:
    """300 digits in 6 shards of 50."""
    uri = str(tmp_path_factory.mktemp("data") / "digits")
    ingest("sklearn:digits", uri, "--limit", "300", "--shard-size", "50")
    return uri


def keys_of(dataset, **loader) -> list[str]:
    return [key for key, _, _ in torch.utils.data.DataLoader(dataset, batch_size=None, **loader)]


def test_stream_matches_load_arrays(digits: str) -> None:
    arrays = load_arrays(digits)
    by_key = {k: (arrays.images[i], int(arrays.labels[i])) for i, k in enumerate(arrays.keys)}
    seen = 0
    for key, image, label in stream(digits, shuffle=100):
        assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
        assert torch.equal(image, by_key[key][0]) and label == by_key[key][1]
        seen += 1
    assert seen == 300
    assert {label for _, _, label in stream(digits, labels=False)} == {-1}


def test_two_workers_every_sample_once(digits: str) -> None:
    keys = keys_of(stream(digits), num_workers=2)
    assert len(keys) == 300 and len(set(keys)) == 300


@pytest.mark.parametrize("shard_size", ["50", "1000"])  # 6 shards; 1 shard (< ranks x workers)
def test_ranks_and_workers_partition(tmp_path: Path, shard_size: str, monkeypatch, ingest) -> None:
    uri = str(tmp_path / "d")
    ingest("sklearn:digits", uri, "--limit", "300", "--shard-size", shard_size)
    parts = []
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; webdataset reads it like an initialised group
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        parts.append(keys_of(stream(uri), num_workers=2))
    assert all(parts) and sum(len(p) for p in parts) == 300
    assert len(set(parts[0]) | set(parts[1])) == 300


def test_shuffle_seeded_and_epoch_dependent(digits: str) -> None:
    order = lambda ds: [k for k, _, _ in ds]  # noqa: E731
    plain = order(stream(digits, shuffle=0))
    assert plain == load_arrays(digits).keys
    first = order(stream(digits, seed=1))
    assert first == order(stream(digits, seed=1)) and first != plain
    assert first != order(stream(digits, seed=2))
    later = stream(digits, seed=1)
    later.set_epoch(1)
    assert order(later) != first and sorted(order(later)) == sorted(first)


def test_repeat_cycles(digits: str) -> None:
    it = iter(stream(digits, repeat=True))
    keys = [next(it)[0] for _ in range(650)]
    assert len(set(keys)) == 300


def test_stream_from_s3(s3_uri: str, ingest) -> None:
    ingest("sklearn:digits", s3_uri, "--limit", "120", "--shard-size", "40")
    keys = keys_of(stream(s3_uri), num_workers=2)
    assert sorted(keys) == sorted(load_arrays(s3_uri).keys) and len(keys) == 120


def test_plain_webdataset_reads_the_shards(digits: str) -> None:
    info = read_info(digits)
    urls = [str(Path(digits) / s.name) for s in info.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l"))
    assert [s["__key__"] for s in samples] == load_arrays(digits).keys
    assert samples[0]["png"].shape == (8, 8)


def test_incomplete_data_set_refused(tmp_path: Path, ingest) -> None:
    uri = str(tmp_path / "half")
    ingest("sklearn:digits", uri, "--limit", "20")
    (tmp_path / "half" / "dataset.json").unlink()
    for read in (read_info, load_arrays, stream):
        with pytest.raises(UserError, match="incomplete data set"):
            read(uri)


def _replace_member(shard: Path, member_name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            content = data if member.name == member_name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


@pytest.fixture
def corrupt(tmp_path: Path, ingest) -> tuple[str, str, str]:
    """A data set whose second shard has one garbage PNG; returns (uri, shard name, key)."""
    uri = str(tmp_path / "c")
    ingest("sklearn:digits", uri, "--limit", "30", "--shard-size", "10")
    shard = read_info(uri).shards[1].name
    with tarfile.open(tmp_path / "c" / shard) as tar:
        key = tar.getnames()[4].split(".")[0]
    _replace_member(tmp_path / "c" / shard, f"{key}.png", b"\x89PNG not really")
    return uri, shard, key


def test_corrupt_member_names_shard_and_key(corrupt) -> None:
    uri, shard, key = corrupt
    for read in (lambda: load_arrays(uri), lambda: list(stream(uri))):
        with pytest.raises(UserError) as exc:
            read()
        assert shard in str(exc.value) and key in str(exc.value) and "\n" not in str(exc.value)


def test_corrupt_member_skipped_and_counted(corrupt) -> None:
    uri, _, key = corrupt
    arrays = load_arrays(uri, skip_corrupt=True)
    assert len(arrays.keys) == 29 and key not in arrays.keys and arrays.skipped == 1
    dataset = stream(uri, skip_corrupt=True)
    assert len(keys_of(dataset, num_workers=2)) == 29
    assert dataset.skipped == 1  # counted inside a worker process, visible here


def test_truncated_shard_names_shard(tmp_path: Path, ingest) -> None:
    uri = str(tmp_path / "t")
    ingest("sklearn:digits", uri, "--limit", "30", "--shard-size", "15")
    shard = tmp_path / "t" / read_info(uri).shards[0].name
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(UserError, match=shard.name):
        load_arrays(uri)
    arrays = load_arrays(uri, skip_corrupt=True)
    assert arrays.skipped == 1 and len(arrays.keys) >= 15  # the intact shard and what preceded the cut


def test_corrupt_member_in_worker_is_still_one_line(corrupt) -> None:
    uri, shard, key = corrupt
    with pytest.raises(UserError) as exc:
        keys_of(stream(uri), num_workers=2)
    message = str(exc.value)
    assert message.startswith(str(Path(uri) / shard)) and key in message and "Traceback" not in message
