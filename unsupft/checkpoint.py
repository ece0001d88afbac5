"""Saving and loading torch state through the store, with `weights_only=True` unless trusted.

`--init`/`--model` options accept either a checkpoint file or a stage's output URI; `resolve` finds
the file inside a stage output so users can chain stages by their output URIs alone.

Pickled checkpoints can run code when loaded, so they are read with torch's safe loader, which
accepts tensors and plain containers only. Checkpoints of training frameworks often also pickle a
config object (solo-learn an omegaconf `DictConfig`, timm's `train.py` an `argparse.Namespace`);
the safe loader refuses those, and the error names the blocking types. A user who trusts such a
file opts in explicitly, per command with `--trust-checkpoint` or per process with
`UNSUPFT_TRUST_CHECKPOINTS=1`; it is off by default, and `unsupft-ctl` never passes the variable
on (a pipeline says `trust_checkpoint: true` on the stage that needs it). `.safetensors` files
hold tensors only and need no trust.
"""

from __future__ import annotations

import io
import re
from typing import Any

import torch

from unsupft import store
from unsupft.errors import UserError
from unsupft.trust import TRUST_ENV, trusted

SUFFIXES = (".pt", ".pth", ".tar", ".ckpt", ".bin", ".safetensors")


def save(uri: str, state: Any) -> None:
    """Serialize `state` (tensors, dicts, lists, numbers, strings) to `uri` atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(uri, buffer.getvalue())


def _blocking_types(data: bytes, message: str) -> list[str]:
    """The non-allowlisted globals in a pickled checkpoint (from the file, else torch's message)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # noqa: BLE001  (a legacy, non-zip file: fall back to the message)
        found = []
    return sorted(set(found)) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def load(uri: str, *, trust: bool | None = None) -> Any:
    """Load a checkpoint (pickled torch file or `.safetensors`); a corrupt, foreign or refused file
    is a one-line error. `trust` None follows `trusted()`."""
    data = store.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:  # noqa: BLE001  (SafetensorError and friends)
            raise UserError(f"{uri}: not a loadable safetensors file ({exc})") from exc
    trust = trusted() if trust is None else trust
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust)
    except Exception as exc:  # torch raises several types for unreadable/unsafe pickles
        text = str(exc).strip()
        if not trust and "Weights only load failed" in text:
            blocked = _blocking_types(data, text)
            if blocked:
                raise UserError(
                    f"{uri}: the safe loader refuses this checkpoint: besides tensors it holds "
                    f"{', '.join(blocked)}; if you trust the file, pass --trust-checkpoint "
                    f"(or set {TRUST_ENV}=1), which lets the file run code while loading") from exc
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"{uri}: not a loadable checkpoint ({first_line})") from exc


def resolve(uri: str, name: str = "model.pt") -> str:
    """A checkpoint file URI from either a file URI or a stage output URI holding `name`."""
    if uri.endswith(SUFFIXES) and store.exists(uri):
        return uri
    inside = store.join(uri, name)
    if store.exists(inside):
        return inside
    if store.exists(uri):
        return uri
    raise UserError(f"{uri}: no checkpoint there (expected a checkpoint file or a stage output holding {name})")
