"""`unsupft ingest` + `unsupft.data` reading: every source kind, locally and on S3, pixel-exact."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from unsupft import store
from unsupft.data import load_arrays, read_info
from unsupft.data.ingest import ingest_command
from unsupft.data.sources import FASHION_MNIST_CLASSES




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


def test_reingest_replaces_manifest_last(tmp_path: Path, ingest) -> None:
    ingest("sklearn:digits", tmp_path / "d", "--limit", "40")
    ingest("sklearn:digits", tmp_path / "d", "--limit", "20", "--seed", "1")
    manifest = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert manifest["samples"] == 20 and "--seed 1" in manifest["source"]


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
