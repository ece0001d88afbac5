"""`unsupft ingest` + `unsupft.data` reading: every source kind, locally and on S3, pixel-exact."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from unsupft import store
from unsupft.data import load_arrays, read_info
from unsupft.data.index import resolve
from unsupft.data.ingest import select
from unsupft.stages.ingest import ingest_command
from unsupft.data.sources import FASHION_MNIST_CLASSES, open_source
from unsupft.errors import UserError




def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    """The IDX format by hand (magic 0,0,type,ndim; big-endian uint32 dims; data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def assert_same_as_source(uri: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    """Every stored sample equals the source image/label its key points to."""
    arrays = load_arrays(uri)
    assert len(arrays.keys) == read_info(uri).samples == len(set(arrays.keys))
    for n, key in enumerate(arrays.keys):
        original = images[int(key)]
        expected = original[None] if original.ndim == 2 else original.transpose(2, 0, 1)
        assert np.array_equal(arrays.images[n].numpy(), expected), key
    if labels is None:
        assert arrays.labels is None
    else:
        assert arrays.labels.tolist() == [int(labels[int(k)]) for k in arrays.keys]


def test_digits_round_trip(store_uri: str, ingest) -> None:
    images, labels = digits_uint8()
    ingest("sklearn:digits", store_uri, "--shard-size", "700")
    info = read_info(store_uri)
    assert (info.samples, info.image_size, info.channels, info.labeled) == (1797, (8, 8), 1, True)
    assert info.classes == [str(i) for i in range(10)] and len(info.shards) == 3
    assert_same_as_source(store_uri, images, labels)


def test_idx_round_trip_gzip_and_plain(store_uri: str, tmp_path: Path, ingest) -> None:
    images, labels = digits_uint8()
    images, labels = images[:300], labels[:300]
    folder = tmp_path / "fashion-mnist"  # the class names follow the Debian package's folder name
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", images, gzipped=True)
    write_idx(folder / "train-labels-idx1-ubyte", labels, gzipped=False)
    ingest(folder / "train-images-idx3-ubyte.gz", store_uri, "--labels", folder / "train-labels-idx1-ubyte")
    assert read_info(store_uri).classes == FASHION_MNIST_CLASSES
    assert_same_as_source(store_uri, images, labels)


def test_npz_round_trip_colour_with_names(store_uri: str, tmp_path: Path, ingest) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 12, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=40)
    np.savez(tmp_path / "set.npz", x=images, y=labels, class_names=np.array(["cat", "dog", "eel"]))
    ingest(tmp_path / "set.npz", store_uri)
    info = read_info(store_uri)
    assert (info.channels, info.image_size, info.classes) == (3, (12, 10), ["cat", "dog", "eel"])
    assert_same_as_source(store_uri, images, labels)


def test_npz_unlabeled_grayscale(store_uri: str, tmp_path: Path, ingest) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(25, 9, 9), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", images=images)
    ingest(tmp_path / "u.npz", store_uri)
    info = read_info(store_uri)
    assert (info.labeled, info.classes, info.channels) == (False, [], 1)
    assert_same_as_source(store_uri, images, None)


def make_folder(root: Path, mode: str, per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Class folders of PNGs; returns images/labels indexed like the ingested keys (sorted order)."""
    rng = np.random.default_rng(2)
    shape = (7, 11) if mode == "L" else (7, 11, 3)
    images, labels = [], []
    for label, name in enumerate(["apple", "banana", "cherry"]):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            image = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(image, mode=mode).save(root / name / f"img{j}.png")
            images.append(image)
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_folder_round_trip(store_uri: str, tmp_path: Path, mode: str, ingest) -> None:
    images, labels = make_folder(tmp_path / "src", mode)
    ingest(tmp_path / "src", store_uri, "--shard-size", "5")
    info = read_info(store_uri)
    assert info.classes == ["apple", "banana", "cherry"]
    assert info.channels == (1 if mode == "L" else 3) and info.image_size == (7, 11)
    assert_same_as_source(store_uri, images, labels)


def test_unlabeled_flag_drops_labels(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "u", "--unlabeled", "--limit", "50")
    info = read_info(str(tmp_path / "u"))
    assert not info.labeled and info.classes == [] and info.samples == 50
    members = {m for s in info.shards for m in _tar_names(tmp_path / "u" / s.name)}
    assert not any(m.endswith(".cls") for m in members)


def _tar_names(path: Path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return tar.getnames()


def test_split_disjoint_stratified_reproducible(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "a", "--split", "0.25", "--seed", "3", "--shard-size", "400")
    ingest("sklearn:digits", tmp_path / "b", "--split", "0.25", "--seed", "3", "--shard-size", "400")
    ingest("sklearn:digits", tmp_path / "c", "--split", "0.25", "--seed", "4", "--shard-size", "400")
    train, test = load_arrays(str(tmp_path / "a/train")), load_arrays(str(tmp_path / "a/test"))
    assert not set(train.keys) & set(test.keys)
    assert len(train.keys) + len(test.keys) == 1797
    _, labels = digits_uint8()
    for c in range(10):  # about a quarter of every class is in test
        share = (test.labels == c).sum().item() / (labels == c).sum()
        assert abs(share - 0.25) < 0.02
    for part in ("train", "test"):
        shards = lambda root: [s.sha256 for s in read_info(str(root / part)).shards]  # noqa: E731
        assert shards(tmp_path / "a") == shards(tmp_path / "b")  # same seed: the same bytes
    assert set(load_arrays(str(tmp_path / "c/test")).keys) != set(test.keys)


def test_class_subsets_disjoint_and_renumbered(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "source", "--classes", "0,1,2,3,4")
    ingest("sklearn:digits", tmp_path / "target", "--classes", "9,5,6,7,8", "--limit", "100")
    source, target = load_arrays(str(tmp_path / "source")), load_arrays(str(tmp_path / "target"))
    assert source.classes == ["0", "1", "2", "3", "4"]
    assert target.classes == ["5", "6", "7", "8", "9"]  # the source's class order
    assert not set(source.keys) & set(target.keys) and len(target.keys) == 100
    _, labels = digits_uint8()
    assert target.labels.tolist() == [int(labels[int(k)]) - 5 for k in target.keys]


def test_cli_subprocess_and_store_uri(s3_uri: str, cli_env) -> None:
    """The real entry point (`python -m unsupft ingest`) writing to S3."""
    proc = subprocess.run(
        [sys.executable, "-m", "unsupft", "ingest", "sklearn:digits", s3_uri, "--limit", "30"],
        env=cli_env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert store.read_json(store.join(s3_uri, "dataset.json"))["samples"] == 30


# ------------------------------------------------------------------------------- bad input ---


def _bad(tmp_path: Path, *args) -> str:
    out = tmp_path / "out"
    result = CliRunner().invoke(ingest_command, [*(str(a) for a in args), str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not list(tmp_path.rglob("dataset.json"))
    return lines[0]


def test_bad_missing_path(tmp_path: Path) -> None:
    assert "no such file" in _bad(tmp_path, tmp_path / "nowhere")


def test_bad_non_image_in_class_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", "L")
    (tmp_path / "src" / "banana" / "notes.txt").write_text("not an image")
    assert "notes.txt" in _bad(tmp_path, tmp_path / "src")


def test_bad_idx_counts_disagree(tmp_path: Path) -> None:
    images, labels = digits_uint8()
    write_idx(tmp_path / "img-idx3", images[:20], gzipped=False)
    write_idx(tmp_path / "lab-idx1", labels[:19], gzipped=True)
    message = _bad(tmp_path, tmp_path / "img-idx3", "--labels", tmp_path / "lab-idx1")
    assert "20 images" in message and "19 labels" in message


def test_bad_truncated_idx(tmp_path: Path) -> None:
    images, _ = digits_uint8()
    write_idx(tmp_path / "img-idx3", images[:20], gzipped=False)
    (tmp_path / "img-idx3").write_bytes((tmp_path / "img-idx3").read_bytes()[:-5])
    assert "img-idx3" in _bad(tmp_path, tmp_path / "img-idx3", "--unlabeled")


def test_bad_unknown_source_kind(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    assert "unknown source kind" in _bad(tmp_path, tmp_path / "data.csv")
    assert "unknown built-in" in _bad(tmp_path, "sklearn:iris")


def test_bad_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "empty folder" in _bad(tmp_path, tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    assert "empty class folder" in _bad(tmp_path, tmp_path / "empty")


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1"])
def test_bad_split_fraction(tmp_path: Path, fraction: str) -> None:
    assert "--split" in _bad(tmp_path, "sklearn:digits", "--split", fraction)


def test_bad_class_name(tmp_path: Path) -> None:
    assert "unknown class 'eleven'" in _bad(tmp_path, "sklearn:digits", "--classes", "1,eleven")


def test_cli_bad_input_subprocess_one_line(tmp_path: Path, cli_env) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unsupft", "ingest", str(tmp_path / "missing"), str(tmp_path / "out")],
        env=cli_env, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing: no such file" in proc.stderr
    assert not (tmp_path / "out").exists()


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_debian_files(tmp_path: Path, ingest) -> None:
    from unsupft.data.sources import read_idx

    ingest(FASHION / "t10k-images-idx3-ubyte.gz", tmp_path / "f", "--labels", FASHION / "t10k-labels-idx1-ubyte.gz",
           "--limit", "200")
    info = read_info(str(tmp_path / "f"))
    assert (info.classes, info.image_size, info.channels) == (FASHION_MNIST_CLASSES, (28, 28), 1)
    assert_same_as_source(str(tmp_path / "f"), read_idx(FASHION / "t10k-images-idx3-ubyte.gz"),
                          read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"))


# ------------------------------------------------------------------------------------ photos ---


def _photo(height: int, width: int, gray: bool = False) -> np.ndarray:
    """Photo-like pixels: smooth gradients and a bright block at the top left (orientation shows)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full((height, width), 60.0)], -1)
    rgb[: height // 3, : width // 3] = 250
    pixels = rgb.round().astype(np.uint8)
    return pixels[..., 1] if gray else pixels


def make_photos(root: Path) -> dict[str, np.ndarray]:
    """Class folders of JPEGs of mixed sizes (one grayscale, one EXIF-rotated) and one PNG.

    Returns the upright pixels of every file by its path relative to `root`.
    """
    from PIL import ExifTags

    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    upright = {}
    for rel, (h, w) in {"cat/a.jpg": (60, 80), "cat/b.jpeg": (90, 50), "dog/c.jpg": (64, 64)}.items():
        upright[rel] = _photo(h, w)
        Image.fromarray(upright[rel]).save(root / rel, quality=92)
    upright["dog/gray.jpg"] = _photo(48, 72, gray=True)
    Image.fromarray(upright["dog/gray.jpg"]).save(root / "dog/gray.jpg", quality=92)
    upright["dog/d.png"] = _photo(30, 45)
    Image.fromarray(upright["dog/d.png"]).save(root / "dog/d.png")
    # A camera held upright stores the sensor's landscape pixels plus "rotate 90 degrees clockwise to
    # show" (EXIF orientation 6): stored 40 x 100, seen 100 x 40.
    upright["cat/turned.jpg"] = _photo(100, 40)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(upright["cat/turned.jpg"]).transpose(Image.Transpose.ROTATE_90).save(
        root / "cat/turned.jpg", quality=92, exif=exif)
    return upright


def stored_members(uri: str) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """(manifest, {key: {ext: bytes}}) of a data set, read through the store (file or S3)."""
    import tarfile

    manifest = store.read_json(store.join(uri, "dataset.json"))
    members: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        with tarfile.open(fileobj=io.BytesIO(store.read_bytes(store.join(uri, shard["name"])))) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return manifest, members


def read_sources(uri: str, manifest: dict) -> dict[str, str]:
    import csv

    rows = csv.reader(io.StringIO(store.read_text(store.join(uri, manifest["sources"]))), delimiter="\t")
    return dict(rows)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_photos_kept_as_they_are_turned_upright_and_traced(store_uri: str, tmp_path: Path, ingest) -> None:
    upright = make_photos(tmp_path / "photos")
    ingest(tmp_path / "photos", store_uri, "--shard-size", "4")
    manifest, members = stored_members(store_uri)
    assert manifest["image_size"] is None  # sizes differ: the reader needs --image-size
    assert (manifest["samples"], manifest["classes"], manifest["channels"]) == (6, ["cat", "dog"], 3)
    assert manifest["sources"] == "sources.tsv"
    sources = read_sources(store_uri, manifest)
    assert sorted(sources.values()) == sorted(upright) and set(sources) == set(members)
    for key, rel in sources.items():
        (ext, data), = ((e, d) for e, d in members[key].items() if e != "cls")
        assert members[key]["cls"] == str(manifest["classes"].index(rel.split("/")[0])).encode()
        original = (tmp_path / "photos" / rel).read_bytes()
        if rel == "cat/turned.jpg":  # turned: re-encoded once, as JPEG, upright
            assert ext == "jpg" and data != original
            image = decoded(data)
            assert image.shape == (100, 40, 3)
            assert np.abs(image - upright[rel]).mean() < 4
        else:  # nothing to change: the file's very bytes, in its own format
            assert (ext, data) == ("png" if rel.endswith(".png") else "jpg", original), rel


def test_resize_keeps_aspect_ratio(tmp_path: Path, ingest) -> None:
    upright = make_photos(tmp_path / "photos")
    ingest(tmp_path / "photos", tmp_path / "out", "--resize", "32")
    manifest, members = stored_members(str(tmp_path / "out"))
    sources = read_sources(str(tmp_path / "out"), manifest)
    assert manifest["image_size"] is None
    for key, rel in sources.items():
        (ext, data), = ((e, d) for e, d in members[key].items() if e != "cls")
        height, width = upright[rel].shape[:2]
        image = decoded(data)
        if min(height, width) <= 32:  # already small: not upscaled, kept as it is
            assert data == (tmp_path / "photos" / rel).read_bytes()
            continue
        short = min(height, width)
        assert image.shape[:2] == (round(height * 32 / short), round(width * 32 / short)), rel
        assert ext == ("png" if rel.endswith(".png") else "jpg")
        expected = np.asarray(Image.fromarray(upright[rel]).convert("RGB").resize(image.shape[1::-1]), dtype=np.int16)
        assert np.abs(image - expected).mean() < 8, rel  # upright (the turned one too) and not stretched


def test_one_size_after_resize_goes_in_the_manifest(tmp_path: Path, ingest) -> None:
    (tmp_path / "p").mkdir()
    for i, (h, w) in enumerate([(40, 60), (80, 120), (20, 30)]):  # one aspect ratio, three sizes
        Image.fromarray(_photo(h, w)).save(tmp_path / "p" / f"{i}.jpg")
    ingest(tmp_path / "p", tmp_path / "mixed")
    ingest(tmp_path / "p", tmp_path / "same", "--resize", "20")
    assert json.loads((tmp_path / "mixed/dataset.json").read_text())["image_size"] is None
    assert json.loads((tmp_path / "same/dataset.json").read_text())["image_size"] == [20, 30]
    assert not read_info(str(tmp_path / "same")).labeled  # a flat folder: unlabeled


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_format_reencodes_every_image(tmp_path: Path, fmt: str, ingest) -> None:
    upright = make_photos(tmp_path / "photos")
    ingest(tmp_path / "photos", tmp_path / "out", "--format", fmt, "--quality", "95")
    manifest, members = stored_members(str(tmp_path / "out"))
    sources = read_sources(str(tmp_path / "out"), manifest)
    for key, rel in sources.items():
        assert set(members[key]) == {fmt, "cls"}
        image = decoded(members[key][fmt])
        expected = np.asarray(Image.fromarray(upright[rel]).convert("RGB"), dtype=np.int16)
        assert image.shape == expected.shape and np.abs(image - expected).mean() < 4, rel


def test_arrays_stay_png_and_can_be_resized(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "d", "--limit", "5", "--unlabeled", "--resize", "4", "--format", "webp")
    manifest, members = stored_members(str(tmp_path / "d"))
    assert manifest["image_size"] == [4, 4] and "sources" not in manifest
    assert all(set(m) == {"webp"} and Image.open(io.BytesIO(m["webp"])).size == (4, 4) for m in members.values())
    ingest("sklearn:digits", tmp_path / "p", "--limit", "5")
    assert all(set(m) == {"png", "cls"} for m in stored_members(str(tmp_path / "p"))[1].values())


def test_plain_webdataset_reads_photo_shards(tmp_path: Path, ingest) -> None:
    import webdataset as wds

    make_photos(tmp_path / "photos")
    ingest(tmp_path / "photos", tmp_path / "out", "--shard-size", "4")
    manifest = json.loads((tmp_path / "out/dataset.json").read_text())
    urls = [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6
    for sample in samples:
        image = sample.get("jpg", sample.get("png"))
        assert image.ndim == 3 and image.shape[2] == 3 and sample["cls"] in (0, 1)


# ----------------------------------------------------------------------------- re-ingestion ---


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reingest_refused_without_overwrite(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "d", "--limit", "40")
    before = _files(tmp_path / "d")
    result = CliRunner().invoke(ingest_command, ["sklearn:digits", str(tmp_path / "d"), "--limit", "20"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "complete data set already" in result.stderr and "--overwrite" in result.stderr
    assert _files(tmp_path / "d") == before
    ingest("sklearn:digits", tmp_path / "s", "--split", "0.5")  # with --split: either part counts
    result = CliRunner().invoke(ingest_command, ["sklearn:digits", str(tmp_path / "s"), "--split", "0.5"])
    assert result.exit_code == 2 and "/s/train: holds a complete data set" in result.stderr


def test_overwrite_replaces_whole_set(store_uri: str, ingest) -> None:
    ingest("sklearn:digits", store_uri, "--limit", "40", "--shard-size", "10")
    old = read_info(store_uri)
    ingest("sklearn:digits", store_uri, "--limit", "20", "--seed", "1", "--shard-size", "10", "--overwrite")
    new = read_info(store_uri)
    manifest = store.read_json(store.join(store_uri, "dataset.json"))
    assert new.samples == 20 and "--seed 1" in manifest["source"]
    assert not {s.name for s in old.shards} & {s.name for s in new.shards}
    assert store.list_prefix(store_uri) == sorted(["dataset.json", *(s.name for s in new.shards)])
    assert len(load_arrays(store_uri).keys) == 20


def test_failed_overwrite_leaves_old_set_whole(tmp_path: Path, ingest) -> None:
    make_photos(tmp_path / "photos")
    ingest(tmp_path / "photos", tmp_path / "out", "--shard-size", "2")
    before = _files(tmp_path / "out")
    broken = tmp_path / "photos" / "dog" / "c.jpg"
    broken.write_bytes(broken.read_bytes()[:-300])  # the header reads, the pixels do not
    photos = open_source(str(tmp_path / "photos"))
    # a seed that puts the broken photo third: two one-photo shards are uploaded before it fails
    seed = next(s for s in range(50) if photos.image(int(select(photos, class_ids=None, limit=None, seed=s)[2])) == broken)
    result = CliRunner().invoke(ingest_command, [str(tmp_path / "photos"), str(tmp_path / "out"), "--overwrite",
                                                 "--shard-size", "1", "--seed", str(seed)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "dog/c.jpg: unreadable image" in result.stderr
    assert _files(tmp_path / "out") == before


# ------------------------------------------------------------------ bad photos, bad options ---


@pytest.mark.parametrize("args,message", [
    (["--resize", "0"], "--resize: 0 is not a positive number"),
    (["--resize", "-5"], "--resize: -5"),
    (["--format", "gif"], "--format: 'gif' is not one of keep, jpg, png, webp"),
    (["--quality", "0"], "--quality: 0 is not in 1..100"),
    (["--quality", "101"], "--quality: 101"),
])
def test_bad_photo_options(tmp_path: Path, args: list[str], message: str) -> None:
    make_photos(tmp_path / "photos")
    assert message in _bad(tmp_path, tmp_path / "photos", *args)
    assert not (tmp_path / "out").exists()


def test_bad_corrupt_photo_named_nothing_written(tmp_path: Path) -> None:
    make_photos(tmp_path / "photos")
    broken = tmp_path / "photos" / "cat" / "a.jpg"
    broken.write_bytes(broken.read_bytes()[:-300])  # a truncated download: the header still reads
    assert "cat/a.jpg: unreadable image" in _bad(tmp_path, tmp_path / "photos")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no pictures here")
    assert "readme.txt: not an image file" in _bad(tmp_path, tmp_path / "docs")
    assert "no readable images (1 unreadable files skipped)" in _bad(tmp_path, tmp_path / "docs", "--skip-corrupt")


def test_skip_corrupt_leaves_out_and_counts(tmp_path: Path) -> None:
    upright = make_photos(tmp_path / "photos")
    broken = tmp_path / "photos" / "cat" / "a.jpg"
    broken.write_bytes(broken.read_bytes()[:-300])  # found when its pixels are read
    (tmp_path / "photos" / "dog" / "notes.txt").write_text("x")  # found by the header scan
    result = CliRunner().invoke(ingest_command, [str(tmp_path / "photos"), str(tmp_path / "out"), "--skip-corrupt"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable image files" in result.stderr
    manifest, members = stored_members(str(tmp_path / "out"))
    sources = read_sources(str(tmp_path / "out"), manifest)
    assert manifest["samples"] == len(members) == len(upright) - 1
    assert sorted(sources.values()) == sorted(set(upright) - {"cat/a.jpg"})


# ----------------------------------------------------------------------- kills and leftovers ---


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 photos of 256 x 256: stored as PNG they take a few seconds, long enough to kill midway."""
    root = tmp_path_factory.mktemp("many")
    base = _photo(256, 256)
    for i in range(200):
        Image.fromarray(np.roll(base, i, axis=1)).save(root / f"{i:03d}.jpg", quality=90)
    return root


def _start_ingest(source: Path, out: Path, tmpdir: Path, cli_env, *args) -> subprocess.Popen:
    tmpdir.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "unsupft", "ingest", str(source), str(out), *args],
        env={**cli_env, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ingestion ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


def test_sigkill_leaves_nothing_the_next_run_keeps(many_photos: Path, tmp_path: Path, cli_env) -> None:
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _start_ingest(many_photos, out, tmpdir, cli_env, "--format", "png", "--shard-size", "10")
    try:
        _wait_for(out / "shard-000003.tar", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "dataset.json").exists()
    assert (out / "_INGESTING.json").exists()  # marks the folder unsupft's, unfinished: readers refuse it
    with pytest.raises(UserError, match="unfinished ingestion"):
        resolve(str(out))
    assert list(tmpdir.iterdir()) == []  # shards are built in anonymous temp files: nothing named
    # what a kill between a temp file's creation and its rename leaves, and a concurrent writer's
    (out / f".tmp-shard-000004.tar~{store._HOST}~{proc.pid}~0a1b").write_bytes(b"partial")
    live = out / f".tmp-shard-000009.tar~{store._HOST}~{os.getpid()}~2c3d"
    live.write_bytes(b"being written")

    rerun = _start_ingest(many_photos, out, tmpdir, cli_env, "--limit", "15", "--shard-size", "10")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json", "sources.tsv", "shard-000000.tar", "shard-000001.tar", live.name])
    assert list(tmpdir.iterdir()) == []
    assert read_info(str(out)).samples == 15


def test_sigterm_deletes_what_it_wrote(many_photos: Path, tmp_path: Path, cli_env) -> None:
    out, tmpdir = tmp_path / "out", tmp_path / "tmp"
    proc = _start_ingest(many_photos, out, tmpdir, cli_env, "--format", "png", "--shard-size", "10")
    try:
        _wait_for(out / "shard-000002.tar", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert list(out.iterdir()) == [] and list(tmpdir.iterdir()) == []


def test_same_size_jpegs_read_back_pixel_exact(tmp_path: Path, ingest) -> None:
    """A folder of one-size JPEGs keeps `[H, W]` and the readers decode the kept JPEG bytes."""
    for name in ("a", "b"):
        (tmp_path / "p" / name).mkdir(parents=True)
        Image.fromarray(_photo(24, 32) if name == "a" else 255 - _photo(24, 32)).save(tmp_path / "p" / name / "x.jpg")
    ingest(tmp_path / "p", tmp_path / "out")
    arrays = load_arrays(str(tmp_path / "out"))
    assert read_info(str(tmp_path / "out")).image_size == (24, 32) and arrays.labels.tolist() == [0, 1]
    for image, name in zip(arrays.images, ("a", "b")):
        expected = np.asarray(Image.open(tmp_path / "p" / name / "x.jpg").convert("RGB")).transpose(2, 0, 1)
        assert np.array_equal(image.numpy(), expected)


def test_sources_tsv_keeps_odd_file_names(tmp_path: Path, ingest) -> None:
    names = ["tab\there.jpg", "ünï cödé.jpg", 'quote".jpg']
    (tmp_path / "p").mkdir()
    for name in names:
        Image.fromarray(_photo(10, 12)).save(tmp_path / "p" / name, format="JPEG")
    ingest(tmp_path / "p", tmp_path / "out")
    manifest = json.loads((tmp_path / "out/dataset.json").read_text())
    assert sorted(read_sources(str(tmp_path / "out"), manifest).values()) == sorted(names)
