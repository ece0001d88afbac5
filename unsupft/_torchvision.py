"""Make torchvision importable when its C++ extension cannot load.

The only torchvision built for torch 2.13.0 (0.28.0) ships as a CUDA build on PyPI. With the CPU
torch its `_C` extension fails to load, and `import torchvision` then dies in
`_meta_registrations.py` with "operator torchvision::nms does not exist", because that module
registers fake kernels for `nms`/`qnms` unconditionally. We only need models and transforms (no
detection ops), so when the extension cannot load we declare the two operator schemas ourselves;
the fake-kernel registration then succeeds and everything else works. Nothing happens when the
extension loads (the GPU image), so the real kernels are never shadowed.

Import `torchvision` through this module (`from unsupft._torchvision import torchvision`) or import
this module first; it is the one place this work-around lives.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for candidate in pathlib.Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except (OSError, RuntimeError):
            return False
    return False


if not _extension_loads():
    # Held by the module: a Library's definitions are withdrawn when it is garbage collected.
    _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _fallback_library.define(schema)

import torchvision  # noqa: E402  (must follow the schema declaration)

__all__ = ["torchvision"]
