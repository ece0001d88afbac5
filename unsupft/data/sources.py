"""What `unsupft ingest` can read: image folders, IDX files, `.npz` arrays, `sklearn:digits` (and
WebDataset shards, which `is_shard_source` recognises and the sample index reads).

Every source becomes a `SourceData`: keys, labels, class names, every image's size, and a way to get
image i: a uint8 array (HxW grayscale or HxWx3 colour) for array sources, the file itself for
folders (so a JPEG can be stored as it is). Sources are checked before anything is written (image
files by their headers; their pixels when they are stored), so bad input fails with one line.
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from unsupft import store
from unsupft.data.encode import UnreadableImage, scan_header
from unsupft.data.info import INFO_NAME, INGESTING_NAME
from unsupft.errors import UserError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class SourceData:
    """A source's samples in their original order; `labels` is None for unlabeled sources.

    `sizes` holds each image's upright (H, W) (EXIF orientation applied); `image(i)` is the pixels
    of an array source or the file of a folder source, whose path relative to `root` is its
    provenance; `unreadable` lists the files `skip_unreadable` left out.
    """

    keys: list[str]
    labels: np.ndarray | None
    classes: list[str]
    channels: int
    sizes: np.ndarray
    image: Callable[[int], np.ndarray | Path]
    root: Path | None = None
    unreadable: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


# what a local path can be besides a file or a folder, by the stat type bits
_SPECIAL_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}


def special_kind(path: Path) -> str | None:
    """What a local path is when it exists but is neither a file nor a folder ("a FIFO", "a broken
    symbolic link to X"), else None. Such a path must be named for what it is: a FIFO or a device
    would block a read or never end it, and a broken link reads as missing, which hides the link."""
    try:
        return _SPECIAL_KINDS.get(stat.S_IFMT(path.stat().st_mode))
    except FileNotFoundError:
        return f"a broken symbolic link to {os.readlink(path)}" if path.is_symlink() else None
    except OSError:  # unreadable, or a link loop: the reader that follows says which
        return None


def require_file_or_folder(path: Path) -> None:
    """One line for a `special_kind` path; files, folders and missing paths (callers say so) pass."""
    kind = special_kind(path)
    if kind is not None:
        raise UserError(f"{path}: is {kind}, not a file or folder")


def is_shard_source(spec: str) -> bool:
    """Whether `spec` names WebDataset shards rather than images or arrays: a brace pattern, a
    `.tar`, anything on S3, or a local folder holding a `dataset.json` or `.tar` files. Such a
    source is read through the sample index (`unsupft.data.samples`), which checks it further.
    A local path that is no file or folder is refused here, before either reader sees it."""
    if "{" in spec or store.is_s3(spec):
        return True
    if spec.startswith("sklearn:"):
        return False
    local = Path(store.normalize(spec))
    require_file_or_folder(local)
    return spec.endswith(".tar") or local.is_dir() and ((local / INFO_NAME).is_file() or (local / INGESTING_NAME).is_file()
                                                       or any(local.glob("*.tar")))


def open_source(spec: str, labels_file: str | None = None, skip_unreadable: bool = False) -> SourceData:
    """Recognise the kind of `spec` (folder, IDX, .npz, sklearn:digits) and read it."""
    if spec.startswith("sklearn:"):
        if spec != "sklearn:digits":
            raise UserError(f"{spec}: unknown built-in data set (known: sklearn:digits)")
        return _digits()
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such file or folder")
    if labels_file is not None and not _is_idx(path):
        raise UserError(f"{spec}: --labels is for IDX image files only")
    if path.is_dir():
        return _folder(path, skip_unreadable)
    if path.suffix == ".npz":
        return _npz(path)
    if _is_idx(path):
        return _idx(path, labels_file)
    raise UserError(f"{spec}: unknown source kind (expected a folder, an IDX file, a .npz or sklearn:digits)")


def _arrays(description: str, images: np.ndarray, labels: np.ndarray | None, classes: list[str]) -> SourceData:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise UserError(f"{description}: images must be N x H x W or N x H x W x 3, not {list(images.shape)}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer):
            raise UserError(f"{description}: images must be uint8 (or integers in 0..255), not {images.dtype.name}")
        low, high = int(images.min(initial=0)), int(images.max(initial=0))
        if low < 0 or high > 255:  # refused, not scaled: an array does not say its bit depth (12? 16?)
            raise UserError(f"{description}: images must be uint8 (or integers in 0..255), not {images.dtype.name} "
                            f"in {low}..{high} (scale them to 0..255 first)")
        images = images.astype(np.uint8)
    if labels is not None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"{description}: labels must be one integer per image")
        if len(labels) != len(images):
            raise UserError(f"{description}: {len(images)} images but {len(labels)} labels")
        if len(labels) and labels.min() < 0:
            raise UserError(f"{description}: negative label {labels.min()}")
        labels = labels.astype(np.int64)
        needed = int(labels.max()) + 1 if len(labels) else 0
        classes = classes or [str(i) for i in range(needed)]
        if len(classes) < needed:
            raise UserError(f"{description}: label {needed - 1} but only {len(classes)} class names")
    if len(images) == 0:
        raise UserError(f"{description}: no images")
    return SourceData(keys=[f"{i:08d}" for i in range(len(images))], labels=labels,
                      classes=classes if labels is not None else [], channels=1 if images.ndim == 3 else 3,
                      sizes=np.broadcast_to(np.array(images.shape[1:3], dtype=np.int32), (len(images), 2)),
                      image=lambda i: images[i])


def _digits() -> SourceData:
    """scikit-learn's 8x8 digits (values 0..16), scaled to 0..255 and kept at their native 8x8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _arrays("sklearn:digits", images, digits.target, [str(i) for i in range(10)])


def _npz(path: Path) -> SourceData:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            content = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz ({exc})") from exc
    image_key = next((k for k in ("images", "x") if k in content), None)
    if image_key is None:
        raise UserError(f"{path}: no 'images' (or 'x') array; it has {sorted(content)}")
    label_key = next((k for k in ("labels", "y") if k in content), None)
    names = [str(n) for n in content["class_names"]] if "class_names" in content else []
    return _arrays(str(path), content[image_key], content[label_key] if label_key else None, names)


def _open_maybe_gzip(path: Path):
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _is_idx(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with _open_maybe_gzip(path) as stream:
            head = stream.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and 1 <= head[3] <= 4


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic, big-endian dims, data), gzipped or not."""
    try:
        with _open_maybe_gzip(path) as stream:
            data = stream.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{path}: IDX header says {list(shape)} ({expected} bytes) but holds {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx(path: Path, labels_file: str | None) -> SourceData:
    images = read_idx(path)
    labels = None
    if labels_file is not None:
        labels_path = Path(labels_file)
        require_file_or_folder(labels_path)
        if not labels_path.is_file():
            raise UserError(f"{labels_file}: no such labels file")
        labels = read_idx(labels_path)
        if labels.ndim != 1:
            raise UserError(f"{labels_file}: an IDX labels file has one dimension, not {labels.ndim}")
        if len(labels) != len(images):
            raise UserError(f"{path}: {len(images)} images but {labels_file} has {len(labels)} labels")
    # Debian's dataset-fashion-mnist (and the upstream files) keep "fashion" in the path.
    names = FASHION_MNIST_CLASSES if "fashion" in str(path.resolve()).lower() else []
    return _arrays(str(path), images, labels, names)


def _folder(root: Path, skip_unreadable: bool) -> SourceData:
    """Class sub-folders of images (labeled), or a flat folder of images (unlabeled)."""
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in visible if p.is_dir()]
    if class_dirs:
        stray = [p for p in visible if not p.is_dir()]
        if stray:
            raise UserError(f"{stray[0]}: a file next to class folders (put every image in its class folder)")
        files = [(f, label) for label, d in enumerate(class_dirs)
                 for f in sorted(d.iterdir()) if not f.name.startswith(".")]
        for f, _ in files:
            if f.is_dir():
                raise UserError(f"{f}: class folders hold image files, not folders")
        empty = next((d for d in class_dirs if not any(f.parent == d for f, _ in files)), None)
        if empty is not None:
            raise UserError(f"{empty}: empty class folder")
    else:
        files = [(f, -1) for f in visible]
    if not files:
        raise UserError(f"{root}: empty folder (expected class sub-folders of images, or images)")
    readable, sizes, gray, unreadable = [], [], [], []
    for f, label in files:
        try:
            kind = special_kind(f)
            if kind is not None:  # before opening it: a FIFO would block the open forever
                raise UnreadableImage(f"{f}: is {kind}, not an image file")
            size, is_gray = scan_header(f)
        except UnreadableImage:
            if not skip_unreadable:
                raise
            unreadable.append(f)
            continue
        readable.append((f, label))
        sizes.append(size)
        gray.append(is_gray)
    if not readable:
        raise UserError(f"{root}: no readable images ({len(unreadable)} unreadable files skipped)")
    return SourceData(keys=[f"{i:08d}" for i in range(len(readable))],
                      labels=np.array([label for _, label in readable], dtype=np.int64) if class_dirs else None,
                      classes=[d.name for d in class_dirs], channels=1 if all(gray) else 3,
                      sizes=np.array(sizes, dtype=np.int32), image=lambda i: readable[i][0], root=root,
                      unreadable=unreadable)
