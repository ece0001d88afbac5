"""Reading and writing backbone weights in the formats users bring and stages exchange.

Formats `load_backbone` accepts (file, or a stage output URI holding `model.pt`):
- unsupft `model.pt`: `{"format": "unsupft-model/1", "arch", "in_channels", "image_size",
  "backbone": state_dict, ["classifier": {"weight", "bias"}, "classes": [...]]}`
- unsupft `moco.pt`: `{"format": "unsupft-moco/1", "arch", "in_channels", "image_size",
  "moco": MoCo state_dict, ...}` (see `unsupft.models.moco`)
- facebookresearch/moco checkpoints: `{"state_dict": {"module.encoder_q.<torchvision name>"}}`
- a plain torchvision ResNet state_dict (optionally under "state_dict"/"model", optionally with a
  "module." prefix); its `fc` is dropped.
The architecture is read from the checkpoint (or guessed from the tensor shapes) and must match
`arch` when given. A 3-channel stem loaded for 1-channel input is summed over colours (and a
1-channel stem spread over 3), the usual way to reuse RGB weights on grayscale images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unsupft import checkpoint
from unsupft.errors import UserError
from unsupft.models.backbones import build_backbone, guess_arch

MODEL_FORMAT = "unsupft-model/1"
MOCO_FORMAT = "unsupft-moco/1"


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state_dict in torchvision names, without `fc`, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


def save_model(
    uri: str,
    backbone: nn.Module,
    arch: str,
    in_channels: int,
    image_size: tuple[int, int] | list[int],
    classifier: nn.Linear | dict[str, torch.Tensor] | None = None,
    classes: list[str] | None = None,
) -> None:
    """Write an unsupft `model.pt` (atomically) that torchvision-style code can load."""
    state: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "arch": arch,
        "in_channels": int(in_channels),
        "image_size": [int(s) for s in image_size],
        "backbone": backbone_state(backbone),
    }
    if classifier is not None:
        params = classifier.state_dict() if isinstance(classifier, nn.Module) else classifier
        state["classifier"] = {k: params[k].detach().cpu().clone() for k in ("weight", "bias")}
        state["classes"] = list(classes or [])
    checkpoint.save(uri, state)


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _split_checkpoint(ckpt: Any, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state in torchvision names, meta) from any accepted checkpoint layout."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{uri}: not a model checkpoint (expected a dict of tensors)")
    fmt = ckpt.get("format")
    meta: dict[str, Any] = {"uri": uri, "arch": None, "in_channels": None, "image_size": None,
                            "classifier": None, "classes": None, "head": None}
    if fmt == MODEL_FORMAT:
        meta.update(format=fmt, arch=ckpt["arch"], in_channels=ckpt["in_channels"],
                    image_size=ckpt.get("image_size"), classifier=ckpt.get("classifier"),
                    classes=ckpt.get("classes"))
        return ckpt["backbone"], meta
    if fmt == MOCO_FORMAT:
        meta.update(format=fmt, arch=ckpt["arch"], in_channels=ckpt["in_channels"],
                    image_size=ckpt.get("image_size"), head=_strip(ckpt["moco"], "head."))
        return _strip(ckpt["moco"], "backbone."), meta
    state = ckpt
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("encoder_q.") for k in state):  # facebookresearch/moco
        query = _strip(state, "encoder_q.")
        head = _strip(query, "fc.")
        meta.update(format="moco", head=head if set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"} else None)
        state = query
    else:
        meta.update(format="torchvision")
    meta["arch"] = ckpt.get("arch") if isinstance(ckpt.get("arch"), str) else None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}, meta


def _adapt_stem(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    weight = state["conv1.weight"]
    have = weight.shape[1]
    if have == in_channels:
        return state
    if have == 3 and in_channels == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif have == 1 and in_channels == 3:
        weight = weight.repeat(1, 3, 1, 1) / 3
    else:
        raise UserError(f"cannot adapt a {have}-channel stem to {in_channels}-channel input")
    return {**state, "conv1.weight": weight}


def load_backbone(
    uri: str, *, arch: str | None = None, in_channels: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A backbone with the weights at `uri` (a checkpoint file or a stage output) and its metadata.

    `meta` holds `arch`, `in_channels`, `image_size`, `format`, and when the checkpoint has them
    `classifier` ({"weight", "bias"}), `classes` and `head` (MoCo projection head state).
    """
    file_uri = checkpoint.resolve(uri)
    state, meta = _split_checkpoint(checkpoint.load(file_uri), file_uri)
    if "conv1.weight" not in state:
        raise UserError(f"{file_uri}: no ResNet backbone weights found (no conv1.weight)")
    found = meta["arch"] or guess_arch(state)
    if found is None and arch is None:
        raise UserError(f"{file_uri}: cannot tell the architecture of this state_dict; pass --arch")
    if arch is not None and found is not None and found != arch:
        raise UserError(f"{file_uri}: checkpoint holds a {found} backbone, but {arch} was asked for")
    arch = arch or found
    stem_channels = int(state["conv1.weight"].shape[1])
    in_channels = in_channels or meta["in_channels"] or stem_channels
    state = _adapt_stem(state, in_channels)
    model = build_backbone(arch, in_channels)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise UserError(f"{file_uri}: weights do not fit a {arch} backbone (tensor shapes differ)") from exc
    if missing or unexpected:
        raise UserError(
            f"{file_uri}: weights do not fit a {arch} backbone "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    meta.update(arch=arch, in_channels=in_channels)
    return model, meta
