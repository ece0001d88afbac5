"""Reading and writing backbone weights in the formats users bring and stages exchange.

Formats `load_backbone` accepts (file, or a stage output URI holding `model.pt`):
- unsupft `model.pt`: `{"format": "unsupft-model/1", "arch", "in_channels", "image_size",
  "backbone": state_dict, "preprocess": {"mean", "std", "image_size", "in_channels", "resize"},
  ["classifier": {"weight", "bias"}, "classes": [...]]}`; `load` turns it into a ready model.
- unsupft `moco.pt`: `{"format": "unsupft-moco/1", "arch", "in_channels", "image_size",
  "moco": MoCo state_dict, ...}` (see `unsupft.models.moco`)
- facebookresearch/moco checkpoints: `{"state_dict": {"module.encoder_q.<torchvision name>"}}`
- a torchvision ResNet state_dict (optionally under "state_dict"/"model", optionally with a
  "module." prefix), also as `.safetensors`; its `fc` is dropped. timm's `train.py` checkpoints
  are of this kind (their pickled `args` need the trust opt-in, see `unsupft.checkpoint`).
- Lightning checkpoints of SSL libraries: the backbone under any prefix (`backbone.`, `encoder.`,
  `model.`, ...), or numbered as `nn.Sequential(*resnet.children())` (lightly's `backbone.0.`).
  Momentum/teacher/EMA copies (solo-learn's `momentum_backbone.`, lightly's `backbone_momentum.`)
  are ignored; their projection heads are not reused (MoCo's head has another layout).
`describe(meta)` is the one line a stage prints about what it loaded.
The architecture is read from the checkpoint (or guessed from the tensor shapes) and must match
`arch` when given. A 3-channel stem loaded for 1-channel input is summed over colours (and a
1-channel stem spread over 3), the usual way to reuse RGB weights on grayscale images. Weights are
checked as they load (`_check_weights`): NaN or infinite values, or integer or bool tensors where
the model keeps floats, are refused with one line naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from unsupft import checkpoint
from unsupft.preprocess import fit, normalization
from unsupft.errors import UserError
from unsupft.models.backbones import ARCHS, build_backbone, guess_arch

MODEL_FORMAT = "unsupft-model/1"
MOCO_FORMAT = "unsupft-moco/1"
# How `Preprocess` resizes, recorded in model.pt for code outside unsupft: `unsupft.preprocess.fit`.
RESIZE = "antialiased short side, centre crop"


def backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state_dict in torchvision names, without `fc`, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items() if not k.startswith("fc.")}


@dataclass(frozen=True)
class Preprocess:
    """How images become a model's input, as the stages do it: when the images have another size
    than `image_size`, `unsupft.preprocess.fit` them (antialiased uint8 resize of the short side,
    centre crop), then scale to [0, 1] and normalise by `mean`/`std`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int] | None  # None: the model takes images at their own size
    in_channels: int

    @classmethod
    def for_model(cls, in_channels: int, image_size: Sequence[int] | None) -> "Preprocess":
        mean, std = normalization(in_channels)
        return cls(mean, std, tuple(int(s) for s in image_size) if image_size else None, in_channels)

    def as_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "in_channels": self.in_channels,
                "image_size": list(self.image_size) if self.image_size else None, "resize": RESIZE}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [C, H, W] or [N, C, H, W] (e.g. `torchvision.io.read_image`) -> float input."""
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.shape[1] != self.in_channels:
            raise ValueError(f"the model takes {self.in_channels}-channel images, got {batch.shape[1]}")
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        if self.image_size is not None:
            batch = fit(batch, self.image_size)
        x = (batch.float() / 255 - mean) / std
        return x if images.ndim == 4 else x[0]


def save_model(uri: str, backbone: nn.Module, arch: str, in_channels: int, image_size: tuple[int, int] | list[int],
               classifier: nn.Linear | None = None, classes: list[str] | None = None) -> None:
    """Write an unsupft `model.pt` (atomically) that torchvision-style code can load."""
    state: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "arch": arch,
        "in_channels": int(in_channels),
        "image_size": [int(s) for s in image_size],
        "backbone": backbone_state(backbone),
        "preprocess": Preprocess.for_model(in_channels, image_size).as_dict(),
    }
    if classifier is not None:
        state["classifier"] = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
        state["classes"] = list(classes or [])
    checkpoint.save(uri, state)


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# torchvision ResNet's children in order: what `nn.Sequential(*list(resnet.children())[:-1])`
# (lightly's examples) numbers `0.` .. `8.`.
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
# Copies of the backbone that self-supervised methods keep beside the trained one (MoCo's key
# encoder, BYOL/solo-learn momentum encoders, DINO teachers, EMA weights): never the one to load.
_SHADOW = re.compile(r"(^|[._])(momentum|encoder_k|teacher|target|ema)([._]|$)")
# Where Lightning modules of SSL libraries keep their projection heads (not reusable by MoCo here).
_HEAD_PREFIXES = ("projector.", "projection_head.", "head.", "prototypes.")


def _backbone_prefixes(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Prefixes under which a whole ResNet sits: (torchvision-named, Sequential-numbered)."""
    named, numbered = [], []
    for key, value in state.items():
        if key.endswith("conv1.weight") and value.ndim == 4:
            prefix = key[: -len("conv1.weight")]
            if (prefix == "" or prefix.endswith(".")) and prefix + "layer1.0.conv1.weight" in state:
                named.append(prefix)
        elif key.endswith("0.weight") and value.ndim == 4:
            prefix = key[: -len("0.weight")]
            if (prefix == "" or prefix.endswith(".")) and prefix + "4.0.conv1.weight" in state:
                numbered.append(prefix)
    return named, numbered


def _renumber(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`0.weight` -> `conv1.weight`, `4.0.conv1.weight` -> `layer1.0.conv1.weight`, ..."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if index.isdigit() and int(index) < len(_RESNET_CHILDREN):
            out[f"{_RESNET_CHILDREN[int(index)]}.{rest}"] = value
    return out


def _find_backbone(state: dict[str, torch.Tensor], uri: str) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(backbone state in torchvision names, the prefix it sat under, whether it was numbered)."""
    named, numbered = _backbone_prefixes(state)
    candidates = [(p, False) for p in named] + [(p, True) for p in numbered]
    kept = [c for c in candidates if not _SHADOW.search(c[0].rstrip("."))]
    if len(kept) > 1:
        shown = ", ".join(repr(p) for p, _ in kept)
        raise UserError(f"{uri}: several ResNet backbones in this checkpoint (under {shown}); save the one you want alone")
    if not kept:
        tops = sorted({k.split(".", 1)[0] + "." for k in state})[:6]
        raise UserError(f"{uri}: no ResNet backbone weights found (no conv1.weight under any prefix; "
                        f"top-level keys: {', '.join(tops) or 'none'})")
    prefix, is_numbered = kept[0]
    inner = _strip(state, prefix)
    return (_renumber(inner) if is_numbered else inner), prefix, is_numbered


def _family(ckpt: dict[str, Any], state: dict[str, torch.Tensor], prefix: str, numbered: bool) -> str:
    """Which tool wrote a foreign checkpoint, for the one line the stages print about it."""
    lightning = "pytorch-lightning_version" in ckpt or ("hyper_parameters" in ckpt and "global_step" in ckpt)
    if prefix == "encoder_q.":
        return "facebookresearch/moco checkpoint"
    if numbered:
        return "lightly checkpoint" if lightning or prefix == "backbone." else f"checkpoint (numbered under '{prefix}')"
    if any(k.startswith("momentum_backbone.") for k in state) or (lightning and any(k.startswith("projector.") for k in state)):
        return "solo-learn checkpoint"
    if lightning:
        return f"Lightning checkpoint (backbone under '{prefix}')"
    if "args" in ckpt and "arch" in ckpt:
        return "timm checkpoint"
    return "torchvision state_dict" if not prefix else f"state_dict (backbone under '{prefix}')"


def _split_checkpoint(ckpt: Any, uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state in torchvision names, meta) from any accepted checkpoint layout."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{uri}: not a model checkpoint (expected a dict of tensors)")
    fmt = ckpt.get("format")
    meta: dict[str, Any] = {"uri": uri, "arch": None, "in_channels": None, "image_size": None,
                            "classifier": None, "classes": None, "head": None, "foreign_head": False,
                            "preprocess": None}
    if fmt == MODEL_FORMAT:
        meta.update(format=fmt, source="unsupft model", arch=ckpt["arch"], in_channels=ckpt["in_channels"],
                    image_size=ckpt.get("image_size"), classifier=ckpt.get("classifier"),
                    classes=ckpt.get("classes"), preprocess=ckpt.get("preprocess"))
        return ckpt["backbone"], meta
    if fmt == MOCO_FORMAT:
        meta.update(format=fmt, source="unsupft MoCo checkpoint", arch=ckpt["arch"], in_channels=ckpt["in_channels"],
                    image_size=ckpt.get("image_size"), head=_strip(ckpt["moco"], "head."))
        return _strip(ckpt["moco"], "backbone."), meta
    state = ckpt
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict) and any(isinstance(v, torch.Tensor) for v in state[key].values()):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    backbone, prefix, numbered = _find_backbone(state, uri)
    meta.update(format="moco" if prefix == "encoder_q." else "torchvision",
                source=_family(ckpt, state, prefix, numbered))
    if prefix == "encoder_q.":  # facebookresearch/moco: its MLP head sits in the query encoder's fc
        head = _strip(backbone, "fc.")
        meta["head"] = head if set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"} else None
    else:
        meta["foreign_head"] = any(k.startswith(_HEAD_PREFIXES) for k in state)
    # timm's train.py records its model name; one unsupft does not build is decided by the shapes
    meta["arch"] = ckpt.get("arch") if ckpt.get("arch") in ARCHS else None
    return {k: v for k, v in backbone.items() if not k.startswith("fc.")}, meta


def describe(meta: dict[str, Any], head: str | None = None) -> str:
    """One line on what was loaded: "solo-learn checkpoint, resnet18, projection head not reused".

    `head` is what the caller did with a projection head ("loaded" or anything else); None for
    stages that use no projection head (then a head in the file is only mentioned as unused)."""
    parts = [meta.get("source") or str(meta.get("format")), str(meta.get("arch"))]
    if head == "loaded":
        parts.append("projection head reused")
    elif meta.get("head") or meta.get("foreign_head"):
        parts.append("projection head not reused" if head is not None else "projection head not used")
    if meta.get("classifier") is not None:
        parts.append(f"classifier over {len(meta.get('classes') or [])} classes")
    return ", ".join(parts)


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


def _check_weights(uri: str, tensors: dict[str, Any], model_state: dict[str, torch.Tensor] | None = None,
                   prefix: str = "") -> None:
    """Refuse weights no model can use as they are, with one line naming the tensor: one that is not
    floating point where the model keeps floats (`load_state_dict` would cast int64 or bool values
    into weights without a word), or one holding NaN or infinite values (every output would be NaN:
    clustering fails on the features, finetuning diverges at its first step). Buffers the model
    keeps as integers (BatchNorm's `num_batches_tracked`) are integers in a checkpoint too.
    `model_state` None: every tensor is a weight (a projection head, a classifier)."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        target = model_state.get(name) if model_state is not None else None
        keeps_floats = target.is_floating_point() if target is not None else model_state is None
        if keeps_floats and not value.is_floating_point():
            raise UserError(f"{uri}: tensor '{prefix}{name}' holds {str(value.dtype).removeprefix('torch.')} values "
                            f"where the model keeps floating-point weights: not a checkpoint of weights")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{uri}: tensor '{prefix}{name}' holds NaN or infinite values: not usable weights "
                            f"(a training run that diverged?)")


def load_backbone(uri: str, *, arch: str | None = None, in_channels: int | None = None,
                  trust: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A backbone with the weights at `uri` (a checkpoint file or a stage output) and its metadata.

    `meta` holds `arch`, `in_channels`, `image_size`, `format`, and when the checkpoint has them
    `classifier` ({"weight", "bias"}), `classes` and `head` (MoCo projection head state).
    `trust` as in `unsupft.checkpoint.load`.
    """
    file_uri = checkpoint.resolve(uri)
    state, meta = _split_checkpoint(checkpoint.load(file_uri, trust=trust), file_uri)
    found = meta["arch"] or guess_arch(state)
    if found is None and arch is None:
        raise UserError(f"{file_uri}: cannot tell the architecture of this state_dict; pass --arch")
    if arch is not None and found is not None and found != arch:
        raise UserError(f"{file_uri}: checkpoint holds a {found} backbone, but {arch} was asked for")
    arch = arch or found
    in_channels = in_channels or meta["in_channels"] or int(state["conv1.weight"].shape[1])
    model = build_backbone(arch, in_channels)
    _check_weights(file_uri, state, model.state_dict())
    for part in ("head", "classifier"):
        if meta.get(part):
            _check_weights(file_uri, meta[part], prefix=f"{part}.")
    state = _adapt_stem(state, in_channels)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise UserError(f"{file_uri}: weights do not fit a {arch} backbone (tensor shapes differ)") from exc
    if missing or unexpected:
        raise UserError(f"{file_uri}: weights do not fit a {arch} backbone ({len(missing)} missing, "
                        f"e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    meta.update(arch=arch, in_channels=in_channels)
    return model, meta


def classifier_layer(classifier: dict[str, torch.Tensor]) -> nn.Linear:
    """The linear classifier a `model.pt` carries ({"weight", "bias"}) as a layer."""
    fc = nn.Linear(classifier["weight"].shape[1], classifier["weight"].shape[0])
    fc.load_state_dict(classifier)
    return fc


def load(uri: str, *, trust: bool | None = None) -> tuple[nn.Module, Preprocess]:
    """A ready torchvision ResNet (eval mode) from any checkpoint `load_backbone` reads, and how to
    feed it. With a classifier (a `transfer`/`label` model) it returns logits over `model.classes`;
    otherwise `fc` is the identity and it returns features. `trust` as in `unsupft.checkpoint.load`.

        model, preprocess = unsupft.models.load("runs/coin")
        logits = model(preprocess(torchvision.io.read_image("digit.png")).unsqueeze(0))
    """
    backbone, meta = load_backbone(uri, trust=trust)
    classifier = meta.get("classifier")
    if classifier is not None:
        backbone.fc = classifier_layer(classifier)
    backbone.classes = list(meta.get("classes") or [])
    recorded = meta.get("preprocess")
    if recorded:  # what the model was trained with, even if unsupft's defaults change later
        preprocess = Preprocess(tuple(recorded["mean"]), tuple(recorded["std"]),
                                tuple(recorded["image_size"]) if recorded.get("image_size") else None,
                                int(recorded["in_channels"]))
    else:
        preprocess = Preprocess.for_model(meta["in_channels"], meta.get("image_size"))
    return backbone.eval(), preprocess
