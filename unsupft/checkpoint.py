"""Saving and loading torch state through the store, always with `weights_only=True`.

`--init`/`--model` options accept either a checkpoint file or a stage's output URI; `resolve` finds
the file inside a stage output so users can chain stages by their output URIs alone.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from unsupft import store
from unsupft.errors import UserError


def save(uri: str, state: Any) -> None:
    """Serialize `state` (tensors, dicts, lists, numbers, strings) to `uri` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(uri, buffer.getvalue())


def load(uri: str) -> Any:
    """Load a checkpoint with `weights_only=True`; a corrupt or foreign file is a one-line error."""
    data = store.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable/unsafe pickles
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{uri}: not a loadable checkpoint ({first_line})") from exc


def resolve(uri: str, name: str = "model.pt") -> str:
    """A checkpoint file URI from either a file URI or a stage output URI holding `name`."""
    if uri.endswith((".pt", ".pth", ".tar", ".ckpt")) and store.exists(uri):
        return uri
    inside = store.join(uri, name)
    if store.exists(inside):
        return inside
    if store.exists(uri):
        return uri
    raise UserError(f"{uri}: no checkpoint there (expected a checkpoint file or a stage output holding {name})")
