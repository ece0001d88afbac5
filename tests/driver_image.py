"""`unsupft-ctl` as it runs in images/driver.Dockerfile: the training libraries are not installed.

    python -m tests.driver_image [unsupft-ctl arguments]

Importing any of `NOT_IN_DRIVER_IMAGE` fails as it would there, so a test (tests/test_images.py)
or a measurement (bench/driver_memory.py) sees the driver's real code path and footprint.
"""

from __future__ import annotations

import importlib.abc
import sys

NOT_IN_DRIVER_IMAGE = ("torch", "torchvision", "numpy", "PIL", "sklearn", "faiss", "webdataset", "matplotlib", "scipy")


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_IN_DRIVER_IMAGE:
            raise ImportError(f"No module named {name!r} (not in the driver image)")
        return None


def main() -> None:
    sys.meta_path.insert(0, _Missing())
    from unsupft.ctl.cli import main as ctl

    ctl(prog_name="unsupft-ctl")


if __name__ == "__main__":
    main()
