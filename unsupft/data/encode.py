"""How `unsupft ingest` stores one image: the source file's own bytes when nothing must change, else
one re-encode.

A JPEG photo stays the same JPEG bytes (no generation loss, no time spent encoding) unless it has to
change: its EXIF orientation is not upright (a reader that ignores EXIF, as most training pipelines
do, would see it sideways, so the pixels are turned with `ImageOps.exif_transpose`), `--resize`
shrinks it, or `--format` asks for another format. Then it is decoded once and encoded once. Arrays
(IDX, .npz, digits) have no file to keep and are encoded losslessly as PNG unless `--format` says
otherwise. Every file is decoded completely once, so a truncated or corrupt photo is refused here,
at ingestion, rather than in the middle of a training run.

Images are 8 bits per channel once decoded, here and in the stages (`eight_bit`): 16-bit pixels are
scaled, never clipped, and pixels with no range to scale from (float, 32-bit) are refused.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from unsupft.errors import UserError

KEEP = "keep"
# member extension -> Pillow format name, for the formats a data set may hold
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# Pillow format name of a source file -> the extension it keeps; MPO is a camera JPEG with extra
# frames appended (JPEG decoders read the first). Other formats (BMP, GIF, TIFF...) become PNG.
_KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# EXIF orientations 2..8 flip or turn the stored pixels (1 is upright; other values are invalid)
_TURNED = {2, 3, 4, 5, 6, 7, 8}
# EXIF orientations 5..8 turn the image by 90 degrees: the upright image has width and height swapped
_SIDEWAYS = {5, 6, 7, 8}
DEFAULT_QUALITY = 90
# What Pillow raises for a file that is not a readable image (malformed EXIF included) or a
# pixel bomb; an unreadable file (permissions) is an OSError too
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError)
# Pillow modes of one channel: a data set whose images are all of these is grayscale (channels 1)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Pillow modes of 16-bit grayscale (16-bit PNG and TIFF); their numpy arrays are uint16
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Pillow modes of 32-bit pixels: whether `eight_bit` takes them depends on their values
WIDE_MODES = ("I", "F")


class UnreadableImage(UserError):
    """An image file that cannot be decoded; the message names the file."""


class UnsupportedPixels(ValueError):
    """Pixels that have no faithful 8-bit form; the message says which (the caller names the image)."""


def eight_bit(img: Image.Image, mode: str) -> Image.Image:
    """`img` in the 8-bit `mode` ("L" or "RGB").

    Pillow's `convert` clips 16- and 32-bit grayscale at 255 (a 0..65535 gradient becomes {0, 255}),
    so those are scaled here instead: 16-bit values keep their high byte, as Pillow itself reads
    16-bit colour PNGs (0..65535 -> 0..255, monotonic). 32-bit integer pixels ("I") are how Pillow
    widens 16-bit PGM and signed TIFF, so they scale the same way when they lie in 0..65535 and are
    refused otherwise, as are float pixels ("F"): nothing says which range would map to 0..255.
    """
    if img.mode == "F":
        raise UnsupportedPixels("floating-point pixels have no known range to scale to 8 bits (store 8- or 16-bit integers)")
    if img.mode == "I" or img.mode in _16BIT_MODES:
        values = np.asarray(img)
        if img.mode == "I" and (values.min() < 0 or values.max() > 0xFFFF):
            raise UnsupportedPixels(f"32-bit integer pixels in {values.min()}..{values.max()} do not fit 16 bits "
                                    f"(0..65535): no known range to scale to 8 bits")
        img = Image.fromarray((values >> 8).astype(np.uint8))
    return img if img.mode == mode else img.convert(mode)


@dataclass(frozen=True)
class Encoding:
    """How to store images: `fmt` is KEEP or a key of FORMATS; `short_side` None keeps the size."""

    fmt: str = KEEP
    short_side: int | None = None
    quality: int = DEFAULT_QUALITY
    channels: int = 3


def stored_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) after shrinking to `short_side` on the short side with the aspect ratio kept.

    Images already that small keep their size: upscaling at ingestion adds bytes, not detail (the
    stages resize to their `--image-size` anyway).
    """
    short = min(height, width)
    if short_side is None or short <= short_side:
        return height, width
    scale = short_side / short
    return max(1, round(height * scale)), max(1, round(width * scale))


def scan_header(path: Path) -> tuple[tuple[int, int], bool]:
    """((H, W) as seen upright after EXIF orientation, grayscale?) from the file's header only."""
    try:
        with Image.open(path) as img:
            sideways = img.getexif().get(ExifTags.Base.Orientation) in _SIDEWAYS
            size = (img.width, img.height) if sideways else (img.height, img.width)
            return size, img.mode in GRAY_MODES
    except PermissionError as exc:
        raise UnreadableImage(f"{path}: permission denied") from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{path}: not an image file ({type(exc).__name__})") from exc


def _encode(img: Image.Image, ext: str, encoding: Encoding) -> bytes:
    out = io.BytesIO()
    img.save(out, format=FORMATS[ext], quality=encoding.quality)  # PNG (lossless) has no quality: Pillow ignores it
    return out.getvalue()


def _resized(img: Image.Image, height: int, width: int) -> Image.Image:
    if (height, width) == (img.height, img.width):
        return img
    return img.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_array(pixels: np.ndarray, encoding: Encoding) -> tuple[bytes, str]:
    """(bytes, extension) of a uint8 HxW or HxWx3 array; KEEP means PNG (lossless)."""
    ext = "png" if encoding.fmt == KEEP else encoding.fmt
    img = Image.fromarray(pixels)
    return _encode(_resized(img, *stored_size(img.height, img.width, encoding.short_side)), ext, encoding), ext


def encode_file(path: Path, encoding: Encoding) -> tuple[bytes, str]:
    """(bytes, extension) to store for the image file at `path`: its own bytes when possible."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    return encode_bytes(data, str(path), encoding)


def encode_bytes(data: bytes, name: str, encoding: Encoding) -> tuple[bytes, str]:
    """(bytes, extension) to store for the encoded image `data` (`name` says where it came from in
    an error): `data` itself when possible, else one decode and one encode."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            source_ext = _KEPT_FORMATS.get(img.format or "")
            ext = (source_ext or "png") if encoding.fmt == KEEP else encoding.fmt
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            # the target size from the file's own size, in its stored orientation
            height, width = stored_size(img.height, img.width, encoding.short_side)
            shrink = (height, width) != (img.height, img.width)
            if shrink:  # JPEG: decode at the smallest 1/2^k scale still >= the target (much faster)
                img.draft(None, (width, height))
            img.load()  # every pixel decoded once: a truncated or corrupt file fails here
            if orientation not in _TURNED and ext == source_ext and not shrink:
                return data, ext
            if orientation in _SIDEWAYS:
                height, width = width, height
            mode = "L" if encoding.channels == 1 else "RGB"
            upright = eight_bit(ImageOps.exif_transpose(img), mode)
            return _encode(_resized(upright, height, width), ext, encoding), ext
    except UnsupportedPixels as exc:
        raise UnreadableImage(f"{name}: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"{name}: unreadable image ({type(exc).__name__}: {exc})") from exc
