"""Bytes on disk and wall time of `unsupft ingest` on a folder of JPEG photos: the previous version
(every image stretched to one size and stored as PNG) against this one, side by side in one run.

The photos are synthetic but photo-like: Fashion-MNIST test images (Debian's dataset-fashion-mnist;
sklearn digits when absent) upscaled bicubically to varied sizes (short side 240..480 px, aspect
3:4..16:9, portrait and landscape), tinted over a colour gradient, with Gaussian sensor noise
(sigma 4), saved as JPEG quality 90; every tenth one is stored sideways with EXIF orientation 6, as
phone cameras do. The previous version is checked out from git (`--baseline-rev`) into a temp dir
and run with the same Python, so both run on the same machine, data and load, interleaved.

    PYTHONPATH=. python bench/ingest_photos.py [--photos 500] [--rounds 1] [--baseline-rev 27d3f9a]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def small_images(count: int) -> np.ndarray:
    if FASHION.exists():
        data = gzip.decompress(FASHION.read_bytes())
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[:count] * 255 / 16).astype(np.uint8)


def make_photos(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    for i, small in enumerate(small_images(count)):
        short = int(rng.integers(240, 481))
        ratio = float(rng.uniform(4 / 3, 16 / 9))
        height, width = (short, int(short * ratio)) if rng.random() < 0.6 else (int(short * ratio), short)
        gray = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32) / 255
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        background = np.stack([x / width, y / height, 1 - x / width], -1) * rng.uniform(60, 200, 3)
        tint = rng.uniform(0.5, 1.0, 3) * 255
        pixels = background * (1 - gray[..., None]) + tint * gray[..., None]
        pixels += rng.normal(0, 4, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if i % 10 == 0:  # stored sideways, shown upright through EXIF
            image.transpose(Image.Transpose.ROTATE_90).save(root / f"{i:04d}.jpg", quality=90, exif=exif)
        else:
            image.save(root / f"{i:04d}.jpg", quality=90)


def ingest_seconds(package_root: Path, photos: Path, out: Path, *args: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, before PYTHONPATH
    subprocess.run([sys.executable, "-m", "unsupft", "ingest", str(photos), str(out), *args], env=env, check=True,
                   capture_output=True, cwd=out.parent)
    return time.perf_counter() - start


def mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-rev", default="27d3f9a", help="git revision of the previous version")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        make_photos(work / "photos", args.photos)
        baseline = work / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev, "unsupft"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        variants = [
            (f"previous ({args.baseline_rev}): PNG, stretched to one size", baseline, []),
            ("now, default: JPEG bytes kept (turned ones re-encoded)", ROOT, []),
            ("now, --format png (lossless, own sizes)", ROOT, ["--format", "png"]),
            ("now, --resize 224 (JPEG q90, short side 224)", ROOT, ["--resize", "224"]),
        ]
        times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        sizes: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
            for n, (name, package, extra) in enumerate(variants):
                out = work / f"out{n}"
                times[name].append(ingest_seconds(package, work / "photos", out, "--shard-size", "100", *extra))
                sizes[name] = mib(out)
        source_mib = mib(work / "photos")
        first = variants[0][0]
        print(f"source: {args.photos} JPEG photos, {source_mib:.1f} MiB")
        print("| variant | on disk (MiB) | x source | x previous | ingest s (best of "
              f"{args.rounds}) | x previous |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in variants:
            best = min(times[name])
            print(f"| {name} | {sizes[name]:.1f} | {sizes[name] / source_mib:.2f} | {sizes[name] / sizes[first]:.2f} "
                  f"| {best:.1f} | {best / min(times[first]):.2f} |")


if __name__ == "__main__":
    main()
