"""Reading data sets: the sample index, lazy samples, integrity checks, foreign shards, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from unsupft import store
from unsupft.data import load_arrays, open_samples, read_info
from unsupft.data.index import cache_dir
from unsupft.data.samples import Fitted, batches_of
from unsupft.preprocess import fit
from unsupft.errors import UserError


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ingest) -> str:
    """300 digits in 6 shards of 50."""
    uri = str(tmp_path_factory.mktemp("data") / "digits")
    ingest("sklearn:digits", uri, "--limit", "300", "--shard-size", "50")
    return uri


def shard_members(uri: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of every shard of a data set, in order."""
    out = []
    for shard in read_info(uri).shards:
        with tarfile.open(Path(uri) / shard.name) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return out


def test_samples_decode_what_the_shards_hold(digits: str) -> None:
    samples = open_samples(digits)
    members = dict(shard_members(digits))
    assert len(samples) == 300 and samples.channels == 1 and samples.image_size == (8, 8)
    for i in (0, 57, 299):  # random access across shards
        key = samples.key(i)
        expected = torch.from_numpy(np.array(Image.open(io.BytesIO(members[f"{key}.png"])).convert("L")))
        assert torch.equal(samples.image(i), expected[None])
        assert int(samples.labels[i]) == int(members[f"{key}.cls"])
    assert samples.keys() == [n[:-4] for n in members if n.endswith(".png")]


def test_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path: Path, ingest) -> None:
    uri = str(tmp_path / "d")
    ingest("sklearn:digits", uri, "--limit", "40", "--shard-size", "20")
    before = set(cache_dir().glob("index/*.npz"))
    first = open_samples(uri)
    made = set(cache_dir().glob("index/*.npz")) - before
    assert len(made) == 2  # one per shard
    assert open_samples(uri).keys() == first.keys() and set(cache_dir().glob("index/*.npz")) - before == made
    shard = tmp_path / "d" / read_info(uri).shards[0].name
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # a byte of the first member's image: same size, a new version
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 does not match"):
        open_samples(uri)


def test_an_unwritable_cache_only_costs_a_rescan(digits: str, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("UNSUPFT_CACHE", str(tmp_path / "not-a-dir"))
    assert len(open_samples(digits)) == 300 and list(tmp_path.iterdir()) == [tmp_path / "not-a-dir"]


def test_lazy_samples_read_in_workers_and_from_s3(digits: str, s3_uri: str) -> None:
    store.copy_prefix(digits, s3_uri)
    local, remote = open_samples(digits), open_samples(s3_uri)
    assert remote.keys() == local.keys()
    batches = list(batches_of(Fitted(remote, (8, 8)), 64, workers=2))
    assert torch.equal(torch.cat(batches), load_arrays(digits).images)


def test_fit_keeps_the_aspect_ratio_and_centre_crops() -> None:
    image = torch.zeros(1, 10, 20, dtype=torch.uint8)
    image[..., 5:15] = 255  # the middle half of the width
    fitted = fit(image, (10, 10))
    assert fitted.shape == (1, 10, 10) and bool((fitted == 255).all())  # the centre square survives
    assert fit(image, (10, 20)) is image


def test_plain_webdataset_reads_the_shards(digits: str) -> None:
    info = read_info(digits)
    urls = [str(Path(digits) / s.name) for s in info.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("l"))
    assert [s["__key__"] for s in samples] == open_samples(digits).keys()
    assert samples[0]["png"].shape == (8, 8)


def test_incomplete_data_set_refused(tmp_path: Path, ingest) -> None:
    uri = str(tmp_path / "half")
    ingest("sklearn:digits", uri, "--limit", "20")
    (tmp_path / "half" / "dataset.json").unlink()
    for read in (read_info, load_arrays, open_samples):
        with pytest.raises(UserError, match="incomplete data set"):
            read(uri)


def _rewrite(shard: Path, change) -> None:
    """Rewrite a tar with `change(name, data) -> data or None (dropped)` applied to each member."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            content = change(member.name, content)
            if content is not None:
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))


@pytest.fixture
def small(tmp_path: Path, ingest) -> tuple[str, Path]:
    uri = str(tmp_path / "c")
    ingest("sklearn:digits", uri, "--limit", "30", "--shard-size", "10")
    return uri, tmp_path / "c" / read_info(uri).shards[1].name


def test_tampered_shard_is_refused_naming_it(small) -> None:
    uri, shard = small
    with tarfile.open(shard) as tar:
        key = tar.getnames()[4].split(".")[0]
    _rewrite(shard, lambda name, data: b"\x89PNG not really" if name == f"{key}.png" else data)
    with pytest.raises(UserError) as exc:
        open_samples(uri)
    assert shard.name in str(exc.value) and "sha256 does not match" in str(exc.value)


def test_sample_count_must_match_the_manifest(small) -> None:
    uri, shard = small
    manifest = json.loads((Path(uri) / "dataset.json").read_text())
    manifest["shards"][1]["samples"] = 12
    manifest["samples"] += 2
    (Path(uri) / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"{shard.name}: holds 10 samples, dataset.json says 12"):
        open_samples(uri)


@pytest.mark.parametrize("name", ["../other/shard-000000.tar", "/etc/shard.tar", "s3://b/x.tar", "a/../../x.tar"])
def test_shard_names_cannot_leave_the_data_set(small, name: str) -> None:
    uri, _ = small
    manifest = json.loads((Path(uri) / "dataset.json").read_text())
    manifest["shards"][0]["name"] = name
    (Path(uri) / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="leaves the data set"):
        open_samples(uri)


def test_truncated_shard_names_shard(small) -> None:
    uri, shard = small
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(UserError, match=shard.name):
        open_samples(uri)


# --------------------------------------------------------------------------- foreign shards ---


def write_foreign(path: Path, samples: list[dict]) -> None:
    """A shard as `webdataset.ShardWriter` writes it (members encoded by extension)."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def rgb(seed: int, size=(12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_shardwriter_jpg_cls_shards_by_pattern_folder_and_tar(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    for s in range(3):
        write_foreign(tmp_path / "f" / f"train-{s:04d}.tar",
                      [{"__key__": f"s{s}-{i}", "jpg": rgb(10 * s + i), "cls": 7 * (i % 2) + 2} for i in range(5)])
    by_pattern = open_samples(str(tmp_path / "f" / "train-{0000..0002}.tar"))
    assert len(by_pattern) == 15 and by_pattern.channels == 3 and by_pattern.image_size is None
    assert by_pattern.classes == ["2", "9"] and by_pattern.labels.tolist() == [0, 1, 0, 1, 0] * 3
    assert by_pattern.image(4).shape == (3, 12, 16)
    assert open_samples(str(tmp_path / "f")).keys() == by_pattern.keys()
    assert len(open_samples(str(tmp_path / "f" / "train-0001.tar"))) == 5


def test_raw_samples_are_the_stored_bytes(tmp_path: Path) -> None:
    """What copying foreign shards into a data set reads: members as stored, never re-encoded."""
    write_foreign(tmp_path / "t.tar", [{"__key__": "a", "jpg": rgb(0), "cls": 4},
                                       {"__key__": "b", "png": rgb(1), "cls": 2}])
    with tarfile.open(tmp_path / "t.tar") as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = open_samples(str(tmp_path / "t.tar"))
    raw = list(samples.raw())
    assert [(r.key, r.extension, r.label) for r in raw] == [("a", "jpg", 1), ("b", "png", 0)]
    assert raw[0].image == stored["a.jpg"] and raw[1].image == stored["b.png"] and samples.classes == ["2", "4"]


def test_img2dataset_style_shards_on_s3(tmp_path: Path, s3_uri: str) -> None:
    """jpg + txt caption + json metadata (a `label` field there is used; none: unlabeled)."""
    labeled = [{"__key__": f"{i:09d}", "jpg": rgb(i), "txt": f"a photo {i}",
                "json": {"url": f"http://x/{i}.jpg", "label": i % 3}} for i in range(6)]
    plain = [{**s, "json": {"url": "http://x"}} for s in labeled]
    write_foreign(tmp_path / "00000.tar", labeled)
    write_foreign(tmp_path / "00001.tar", plain)
    store.upload_file(tmp_path / "00000.tar", f"{s3_uri}/labeled/00000.tar")
    store.upload_file(tmp_path / "00001.tar", f"{s3_uri}/plain/00001.tar")
    samples = open_samples(f"{s3_uri}/labeled/{{00000..00000}}.tar")
    assert samples.labels.tolist() == [0, 1, 2, 0, 1, 2] and samples.classes == ["0", "1", "2"]
    assert samples.image(5).shape == (3, 12, 16)
    assert open_samples(f"{s3_uri}/plain").labels is None


@pytest.mark.parametrize("case,message", [
    ("missing", "the pattern names .*train-0002.tar, which does not exist"),
    ("nothing", "incomplete data set"),
    ("no-image", "sample 'a' has no image member"),
    ("partly-labeled", "1 of 2 samples have no label"),
])
def test_bad_foreign_inputs_are_one_line(tmp_path: Path, case: str, message: str) -> None:
    (tmp_path / "f").mkdir()
    write_foreign(tmp_path / "f" / "train-0000.tar", [{"__key__": "x", "jpg": rgb(0), "cls": 1}])
    write_foreign(tmp_path / "f" / "train-0001.tar", [{"__key__": "y", "jpg": rgb(1), "cls": 1}])
    uri = {"missing": str(tmp_path / "f" / "train-{0000..0002}.tar"), "nothing": str(tmp_path / "empty")}.get(case)
    if case == "no-image":
        write_foreign(tmp_path / "t.tar", [{"__key__": "a", "txt": "only a caption"}])
        uri = str(tmp_path / "t.tar")
    if case == "partly-labeled":
        write_foreign(tmp_path / "t.tar", [{"__key__": "a", "jpg": rgb(0), "cls": 1}, {"__key__": "b", "jpg": rgb(1)}])
        uri = str(tmp_path / "t.tar")
    with pytest.raises(UserError, match=message) as exc:
        open_samples(uri)
    assert "\n" not in str(exc.value)


def test_corrupt_member_in_a_worker_is_one_line(tmp_path: Path) -> None:
    """A foreign shard has no digest to check, and a truncated JPEG's header still parses: the broken
    image is found when decoded, in a DataLoader worker."""
    write_foreign(tmp_path / "t.tar", [{"__key__": f"k{i}", "jpg": rgb(i, (64, 64))} for i in range(4)])
    _rewrite(tmp_path / "t.tar", lambda name, data: data[:len(data) // 2] if name == "k2.jpg" else data)
    samples = open_samples(str(tmp_path / "t.tar"))
    with pytest.raises(UserError) as exc:
        list(batches_of(Fitted(samples, (8, 8)), 2, workers=2))
    message = str(exc.value)
    assert message.startswith(str(tmp_path / "t.tar")) and "'k2'" in message and "Traceback" not in message
