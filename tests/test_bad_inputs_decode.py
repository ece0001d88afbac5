"""Issue 24, what decoding changed or reported wrongly (beside the bad-input corpus, tests/test_bad_inputs.py).

16-bit images are scaled to 8 bits, not clipped (a 0..65535 gradient decoded to {0, 255}); pixels with
no 8-bit form (float, 32-bit beyond 16 bits) are refused in one line. Labels written as text
(`{"label": "0"}`) are read; labels that are no class id (a name, a boolean, -3, a number beyond
int64) are one line naming the shard and key, never dropped or a traceback; -1 marks an unlabeled
sample. A FIFO or a broken symbolic link given as data says what it is. The missing-size message
says "give" once. Every refusal: exit 2, one `error:` line, no traceback, nothing written.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.test_bad_inputs import MOCO, _png, _tar, _tree
from unsupft.cli import main as unsupft_main
from unsupft.data.encode import Encoding, encode_bytes
from unsupft.data.samples import decode_image, image_size_of, open_samples
from unsupft.errors import UserError

# one row of 256 16-bit values i * 257 (0..65535): their 8-bit form is exactly 0..255
GRADIENT = (np.arange(256, dtype=np.uint32) * 257).reshape(1, 256)
EIGHT_BIT = np.arange(256, dtype=np.uint8).reshape(1, 256)


def _saved(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.frombytes(mode, array.shape[::-1], array.tobytes()) if mode else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png16_colour(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2), written by hand: Pillow reads these but cannot write them."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    height, width = rgb.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PNG16 = _saved(GRADIENT.astype(np.uint16), "PNG")  # Pillow opens it as "I;16"
WIDE_IMAGES = {  # every way Pillow holds 16-bit grayscale: PNG "I;16", big-endian TIFF "I;16B", 32-bit "I"
    "png-I;16": PNG16,
    "tiff-I;16B": _saved(GRADIENT.astype(">u2"), "TIFF", "I;16B"),
    "tiff-I": _saved(GRADIENT.astype(np.int32), "TIFF"),
    "pgm-I": b"P5\n256 1\n65535\n" + GRADIENT.astype(">u2").tobytes(),
}
COLOUR16 = _png16_colour(np.stack([GRADIENT, GRADIENT[:, ::-1], GRADIENT], axis=-1).astype(np.uint16))
NO_8BIT_FORM = {  # (file, what the error line says)
    "float": (_saved(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "TIFF"), "floating-point"),
    "int32-beyond-16-bits": (_saved((np.arange(64, dtype=np.int32) << 20).reshape(8, 8), "TIFF"), "do not fit 16 bits"),
    "int32-negative": (_saved(np.arange(-32, 32, dtype=np.int32).reshape(8, 8), "TIFF"), "-32..31"),
}


def _ok(args: list[str]) -> None:
    result = CliRunner().invoke(unsupft_main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)


def _refused(args: list[str], needle: str, *roots: Path) -> str:
    """Run the CLI; assert exit 2, one `error:` line holding `needle`, no traceback, nothing written
    under `roots`. Returns the error line."""
    before = _tree(*roots)
    result = CliRunner().invoke(unsupft_main, [str(a) for a in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert needle in errors[0], errors[0]
    assert _tree(*roots) == before
    return errors[0]


def _labels_of(data_set: Path) -> dict[str, int]:
    """key -> the label an unsupft data set's shards hold."""
    labels = {}
    for shard in sorted(data_set.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            labels |= {m.name[:-4]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
    return labels


def _pixels(data: Path) -> list[np.ndarray]:
    """Every image of a data option, as a stage reads it (uint8 [C, H, W])."""
    samples = open_samples(str(data))
    return [samples.image(i).numpy() for i in range(len(samples))]


# -- case 9: 16-bit images are scaled, not clipped ----------------------------------------------


@pytest.mark.parametrize("kind", sorted(WIDE_IMAGES))
def test_16_bit_grayscale_scales_to_the_full_8_bit_range(kind: str) -> None:
    """Where stages decode (`decode_image`) and where ingest re-encodes (`encode_bytes`), in 1 and 3
    channels: the gradient decodes to 0..255, monotonic, each value its 16-bit value's high byte."""
    data = WIDE_IMAGES[kind]
    for channels in (1, 3):
        decoded = decode_image(data, channels, lambda: kind).numpy()
        assert decoded.shape == (channels, 1, 256)
        assert (decoded == EIGHT_BIT).all(), np.unique(decoded)
        stored, ext = encode_bytes(data, kind, Encoding(fmt="png", channels=channels))
        assert ext == "png" and (decode_image(stored, channels, lambda: kind).numpy() == EIGHT_BIT).all()


def test_16_bit_colour_png_scales_the_same_way() -> None:
    decoded = decode_image(COLOUR16, 3, lambda: "colour").numpy()
    assert (decoded[0] == EIGHT_BIT).all() and (decoded[1] == EIGHT_BIT[:, ::-1]).all() and (decoded[2] == EIGHT_BIT).all()


def test_ingest_and_stages_read_16_bit_images_scaled(tmp_path: Path) -> None:
    """A folder (a 16-bit PNG kept as it is, a 16-bit TIFF re-encoded), foreign tars read by a
    stage's reader and ingested with --format png: every image decodes to 0..255."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(PNG16)
    (folder / "b.tif").write_bytes(WIDE_IMAGES["tiff-I;16B"])
    _ok(["ingest", folder, tmp_path / "from-folder"])
    (tmp_path / "gray.tar").write_bytes(_tar({"a.png": PNG16, "b.png": PNG16}))
    (tmp_path / "colour.tar").write_bytes(_tar({"a.png": COLOUR16}))
    for name in ("gray", "colour"):
        _ok(["ingest", tmp_path / f"{name}.tar", tmp_path / f"from-{name}", "--format", "png"])
    gray = [*_pixels(folder.with_name("from-folder")), *_pixels(tmp_path / "gray.tar"), *_pixels(tmp_path / "from-gray")]
    assert len(gray) == 6 and all((image == EIGHT_BIT).all() for image in gray), [np.unique(image) for image in gray]
    for colour in (*_pixels(tmp_path / "colour.tar"), *_pixels(tmp_path / "from-colour")):
        assert (colour[0] == EIGHT_BIT).all() and (colour[1] == EIGHT_BIT[:, ::-1]).all()


@pytest.mark.parametrize("kind", sorted(NO_8BIT_FORM))
def test_pixels_with_no_8_bit_form_are_one_line(kind: str, tmp_path: Path) -> None:
    """In a folder `ingest` refuses them; in a foreign tar a stage refuses them while indexing,
    before it writes anything (not after, when a DataLoader worker decodes them)."""
    data, needle = NO_8BIT_FORM[kind]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.tif").write_bytes(data)
    assert "a.tif" in _refused(["ingest", tmp_path / "photos", tmp_path / "out"], needle, tmp_path)
    (tmp_path / "wide.tar").write_bytes(_tar({"a.png": data, "b.png": data}))
    line = _refused(["pretrain", "--data", tmp_path / "wide.tar", "--out", tmp_path / "o", "--arch", "tiny",
                     "--image-size", "8", *MOCO], needle, tmp_path)
    assert "wide.tar: sample 'a'" in line


@pytest.mark.parametrize("array, needle", [(GRADIENT.astype(np.uint16)[None], "uint16 in 0..65535"),
                                           (np.arange(-5, 59, dtype=">i2").reshape(1, 8, 8), "int16 in -5..58")],
                         ids=["npz-uint16", "idx-int16"])
def test_wide_arrays_are_refused_not_clipped(array: np.ndarray, needle: str, tmp_path: Path) -> None:
    """An array does not say its bit depth: integers beyond 0..255 are refused with their range."""
    if array.dtype == np.uint16:
        source = tmp_path / "a.npz"
        np.savez(source, images=array)
    else:
        source = tmp_path / "images-idx3-ubyte"
        source.write_bytes(b"\0\0\x0b\x03" + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes())
    _refused(["ingest", source, tmp_path / "out"], needle, tmp_path)


# -- case 10, 8 and 12: labels are read or refused, never dropped --------------------------------


def test_json_labels_written_as_text_are_read(tmp_path: Path) -> None:
    shard = tmp_path / "text.tar"
    shard.write_bytes(_tar({"a.png": _png(8), "a.json": b'{"label": "0"}', "b.png": _png(8), "b.json": b'{"label": " 2 "}',
                            "c.png": _png(8), "c.json": b'{"caption": "x", "target": "2"}'}))
    assert open_samples(str(shard)).labels.tolist() == [0, 1, 1]  # what a stage reads: ids 0 and 2 as classes 0, 1
    _ok(["ingest", shard, tmp_path / "out"])
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["labeled"] and manifest["classes"] == ["0", "2"]
    assert _labels_of(tmp_path / "out") == {"a": 0, "b": 1, "c": 1}


def test_a_json_member_without_a_label_keeps_the_cls_label(tmp_path: Path) -> None:
    """img2dataset-style metadata (`.json` with a caption) beside a `.cls`: the label is the `.cls`."""
    (tmp_path / "f.tar").write_bytes(_tar({"a.png": _png(8), "a.cls": b"0", "a.json": b'{"caption": "x"}',
                                           "b.png": _png(8), "b.cls": b"1", "b.json": b'{"caption": "y"}'}))
    _ok(["ingest", tmp_path / "f.tar", tmp_path / "d"])
    assert _labels_of(tmp_path / "d") == {"a": 0, "b": 1}


BAD_LABELS = {  # member of sample 'b' -> what the error line says
    "json-class-name": ({"b.json": b'{"label": "cat"}'}, "json field 'label' is 'cat', not a class id"),
    "json-bool": ({"b.json": b'{"label": true}'}, "is True, not a class id"),
    "json-float": ({"b.json": b'{"class": 1.5}'}, "is 1.5, not a class id"),
    "json-too-deep": ({"b.json": b"[" * 100_000}, "nested too deeply"),
    "cls-beyond-int64": ({"b.cls": b"99999999999999999999"}, "too large for a class id"),
    "cls-5000-digits": ({"b.cls": b"9" * 5000}, "too large for a class id"),
    "json-beyond-int64": ({"b.json": b'{"label": 9223372036854775808}'}, "too large for a class id"),
    "cls-negative": ({"b.cls": b"-3"}, "'-3': class ids are 0 or more"),
    "json-negative": ({"b.json": b'{"label": -3}'}, "-3: class ids are 0 or more"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LABELS))
def test_labels_that_are_no_class_id_are_one_line(kind: str, tmp_path: Path) -> None:
    member, needle = BAD_LABELS[kind]
    shard = tmp_path / "bad.tar"
    shard.write_bytes(_tar({"a.png": _png(8), "a.cls": b"0", "b.png": _png(8), **member}))
    line = _refused(["ingest", shard, tmp_path / "out"], needle, tmp_path)
    assert "bad.tar: sample 'b'" in line and "no label" not in line


def test_a_label_beyond_int64_stops_a_stage_in_one_line(tmp_path: Path) -> None:
    """Not an OverflowError traceback, which the controller took for a bug and retried 3 times."""
    shard = tmp_path / "huge.tar"
    shard.write_bytes(_tar({"a.png": _png(8), "a.cls": b"99999999999999999999", "b.png": _png(8), "b.cls": b"1"}))
    line = _refused(["pretrain", "--data", shard, "--out", tmp_path / "o", "--arch", "tiny", "--image-size", "8", *MOCO],
                    "too large for a class id", tmp_path)
    assert "huge.tar: sample 'a'" in line


def test_minus_one_marks_an_unlabeled_sample(tmp_path: Path) -> None:
    (tmp_path / "none.tar").write_bytes(_tar({"a.png": _png(8), "a.cls": b"-1", "b.png": _png(8), "b.json": b'{"label": -1}'}))
    _ok(["ingest", tmp_path / "none.tar", tmp_path / "out"])
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["labeled"] is False
    (tmp_path / "some.tar").write_bytes(_tar({"a.png": _png(8), "a.cls": b"-1", "b.png": _png(8), "b.cls": b"1"}))
    _refused(["ingest", tmp_path / "some.tar", tmp_path / "out2"], "1 of 2 samples have no label", tmp_path)


# -- case 12: a FIFO or a broken link is named for what it is --------------------------------------


@pytest.fixture
def odd_paths(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo.tar")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "dangling.tar").symlink_to(tmp_path / "gone.tar")
    (tmp_path / "classes" / "a").mkdir(parents=True)
    (tmp_path / "classes" / "a" / "x.png").write_bytes(_png(8))
    (tmp_path / "classes" / "a" / "y.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "idx").write_bytes(b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (1, 8, 8)) + bytes(64))
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (["{t}/fifo"], "{t}/fifo: is a FIFO, not a file or folder"),
    (["{t}/fifo.tar"], "{t}/fifo.tar: is a FIFO, not a file or folder"),
    (["{t}/dangling"], "{t}/dangling: is a broken symbolic link to {t}/gone, not a file or folder"),
    (["{t}/dangling.tar"], "{t}/dangling.tar: is a broken symbolic link to {t}/gone.tar, not a file or folder"),
    (["{t}/classes"], "{t}/classes/a/y.png: is a broken symbolic link to {t}/gone.png, not an image file"),
    (["{t}/idx", "--labels", "{t}/fifo"], "{t}/fifo: is a FIFO, not a file or folder"),
], ids=["fifo", "fifo-tar", "dangling", "dangling-tar", "dangling-in-class-folder", "fifo-labels"])
def test_a_fifo_or_broken_link_is_named(args: list[str], needle: str, odd_paths: Path) -> None:
    _refused(["ingest", *(a.format(t=odd_paths) for a in args), odd_paths / "out"], needle.format(t=odd_paths), odd_paths)


@pytest.mark.parametrize("name, needle", [("fifo", "is a FIFO"), ("dangling", "is a broken symbolic link to")])
def test_stages_name_a_fifo_or_broken_link_too(name: str, needle: str, odd_paths: Path) -> None:
    _refused(["pretrain", "--data", odd_paths / name, "--out", odd_paths / "out", *MOCO], f"{odd_paths}/{name}: {needle}",
             odd_paths)


def test_a_fifo_in_an_image_folder_is_named_not_waited_on(odd_paths: Path) -> None:
    """Opening a FIFO blocks until something writes to it: ingest hung on one in a flat folder."""
    (odd_paths / "flat").mkdir()
    (odd_paths / "flat" / "a.png").write_bytes(_png(8))
    os.mkfifo(odd_paths / "flat" / "b.png")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        refused = pool.submit(_refused, ["ingest", odd_paths / "flat", odd_paths / "out"],
                              f"{odd_paths}/flat/b.png: is a FIFO, not an image file", odd_paths)
        try:
            refused.result(timeout=30)
        except concurrent.futures.TimeoutError:
            os.close(os.open(odd_paths / "flat" / "b.png", os.O_WRONLY | os.O_NONBLOCK))  # let its open return
            pytest.fail("ingest waited on the FIFO")


# -- case 13: the missing-size message ---------------------------------------------------------------


def test_missing_image_size_says_give_once(tmp_path: Path) -> None:
    from unsupft.models import build_backbone, save_model

    mixed = tmp_path / "mixed.tar"
    mixed.write_bytes(_tar({"a.png": _png(8), "b.png": _png(12)}))
    save_model(str(tmp_path / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    for stage in (["pretrain", "--data", mixed, "--arch", "tiny"], ["adapt", "--init", tmp_path / "init", "--target", mixed]):
        line = _refused([*stage, "--out", tmp_path / "o", *MOCO], "; give --image-size", tmp_path)
        assert "give give" not in line
    with pytest.raises(UserError, match="; give an --init with a recorded image size$") as refused:
        image_size_of(open_samples(str(mixed)), None, "give an --init with a recorded image size")
    assert "give give" not in str(refused.value)
