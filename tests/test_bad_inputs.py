"""The bad-input corpus (issue 16): every case ends with exit code 2, exactly one `error:` line, no
traceback, and no file written or changed, neither in the inputs nor where the output would go.

A table of cases, run in-process through the real CLIs (`unsupft`, `unsupft-ctl`) with Click's
runner: fast enough to run every case in CI. Placeholders in the arguments name what the module
fixture made: `{data}` a digits data set, `{init}` a tiny model, `{done}` a finished pretrain output
(seed 0), `{t}` a fresh folder per case holding the case's own files (`files`), `{s3}` a fresh S3
prefix on the test server.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from unsupft import store
from unsupft.cli import main as unsupft_main
from unsupft.ctl.cli import main as ctl_main

MOCO = ["--steps", "2", "--batch-size", "16", "--queue-size", "32", "--workers", "0"]
PIPE = "name: p\nstore: file://{t}/store\nstages:\n  a: {kind: pretrain, data: [{data}], arch: tiny, {extra}}\n"
def _bomb() -> str:
    """The billion laughs: 9 levels of 9 aliases to the level below (9^9 strings), ~600 bytes."""
    lines = ['name: p', 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\nstages: {x: {kind: pretrain, data: [/x]}}\n"


BOMB = _bomb()


@dataclass
class Case:
    id: str
    args: list[str]
    files: dict[str, bytes | str] = field(default_factory=dict)  # written under {t} first
    needle: str = ""  # a word the error line must contain
    ctl: bool = False
    s3: bool = False
    prepare: Callable[[Path, dict[str, str]], None] | None = None  # (case folder, world): makes derived files


def pipe(extra: str) -> dict[str, str]:
    return {"p.yaml": PIPE.replace("{extra}", extra)}


CASES = [
    # -- numbers ---------------------------------------------------------------------------
    *[Case(f"pretrain-{opt}-{v}", ["pretrain", "--data", "{data}", "--out", "{t}/o", *MOCO, f"--{opt}", v], needle=opt)
      for opt, v in [("lr", "nan"), ("lr", "inf"), ("lr", "-1"), ("lr", "0"), ("temperature", "nan"), ("temperature", "0"),
                     ("queue-size", "1000000000"), ("image-size", "100000"), ("image-size", "4"),
                     ("steps", "abc"), ("steps", "0"), ("steps", "99999999999999999999"), ("batch-size", "0"),
                     ("key-momentum", "1"), ("key-momentum", "nan"), ("target-ratio", "1"), ("seed", "-1"),
                     ("workers", "1000"), ("checkpoint-every", "-1"), ("epochs", "nan")]],
    Case("pretrain-steps-and-epochs", ["pretrain", "--data", "{data}", "--out", "{t}/o", *MOCO, "--epochs", "1"], needle="not both"),
    *[Case(f"adapt-{opt}-{v}", ["adapt", "--init", "{init}", "--target", "{data}", "--out", "{t}/o", *MOCO, f"--{opt}", v], needle=opt)
      for opt, v in [("replay-fraction", "1"), ("replay-fraction", "nan"), ("mix-alpha", "0"), ("mix-alpha", "inf")]],
    *[Case(f"transfer-{opt}-{v}", ["transfer", "--init", "{init}", "--train", "{data}", "--out", "{t}/o", f"--{opt}", v], needle=opt)
      for opt, v in [("lr-head", "nan"), ("lr-backbone", "-1"), ("coin-alpha", "2"), ("shots", "0"), ("epochs", "0"),
                     ("batch-size", "-3")]],
    Case("bn-adapt-epochs-0", ["bn-adapt", "--init", "{init}", "--data", "{data}", "--out", "{t}/o", "--epochs", "0"], needle="epochs"),
    Case("evaluate-trials-0", ["evaluate", "--model", "m={init}", "--train", "{data}", "--test", "{data}", "--out", "{t}/o",
                               "--trials", "0"], needle="trials"),
    Case("evaluate-shots-words", ["evaluate", "--model", "m={init}", "--train", "{data}", "--test", "{data}", "--out", "{t}/o",
                                  "--shots", "a,b"], needle="--shots"),
    Case("label-budget-nan", ["label", "--init", "{init}", "--data", "{data}", "--out", "{t}/o", "--budget", "nan"], needle="budget"),
    Case("label-per-round-0", ["label", "--init", "{init}", "--data", "{data}", "--out", "{t}/o", "--per-round", "0"], needle="per-round"),
    Case("unknown-option", ["pretrain", "--data", "{data}", "--out", "{t}/o", "--colour", "red"], needle="No such option"),
    Case("unknown-stage", ["pretrian"], needle="No such command"),
    # -- URIs ------------------------------------------------------------------------------
    Case("data-missing", ["pretrain", "--data", "{t}/nothing", "--out", "{t}/o", *MOCO], needle="nothing"),
    Case("data-s3-no-bucket-name", ["pretrain", "--data", "s3://", "--out", "{t}/o", *MOCO], needle="bucket"),
    Case("data-ftp", ["pretrain", "--data", "ftp://host/x", "--out", "{t}/o", *MOCO], needle="scheme"),
    Case("data-file-host", ["pretrain", "--data", "file://host/x", "--out", "{t}/o", *MOCO], needle="file URIs"),
    Case("out-under-a-file", ["pretrain", "--data", "{data}", "--out", "{t}/afile/o", *MOCO], files={"afile": "x"}, needle="afile"),
    Case("init-missing", ["adapt", "--init", "{t}/nope", "--target", "{data}", "--out", "{t}/o", *MOCO], needle="nope"),
    Case("train-missing", ["transfer", "--init", "{init}", "--train", "{t}/nope", "--out", "{t}/o"], needle="nope"),
    Case("s3-missing-bucket", ["pretrain", "--data", "s3://no-such-bucket-x/d", "--out", "{t}/o", *MOCO], needle="no such bucket", s3=True),
    Case("s3-missing-dataset", ["pretrain", "--data", "{s3}/nothing", "--out", "{t}/o", *MOCO], needle="nothing", s3=True),
    # -- checkpoints -----------------------------------------------------------------------
    Case("init-garbage", ["adapt", "--init", "{t}/model.pt", "--target", "{data}", "--out", "{t}/o", *MOCO],
         files={"model.pt": b"\x00garbage\xff" * 10}, needle="model.pt"),
    Case("init-json", ["transfer", "--init", "{t}/model.pt", "--train", "{data}", "--out", "{t}/o"],
         files={"model.pt": "{\"a\": 1}"}, needle="model.pt"),
    Case("init-empty", ["transfer", "--init", "{t}/model.pt", "--train", "{data}", "--out", "{t}/o"],
         files={"model.pt": b""}, needle="model.pt"),
    # -- manifests -------------------------------------------------------------------------
    Case("dataset-json-invalid", ["pretrain", "--data", "{t}/d", "--out", "{t}/o", *MOCO],
         files={"d/dataset.json": "{not json"}, needle="dataset.json"),
    Case("dataset-json-list", ["pretrain", "--data", "{t}/d", "--out", "{t}/o", *MOCO],
         files={"d/dataset.json": "[1, 2]"}, needle="dataset.json"),
    Case("dataset-no-manifest", ["pretrain", "--data", "{t}/d", "--out", "{t}/o", *MOCO],
         files={"d/shard-000000.tar": b"x"}, needle="d"),
    # -- labels files ----------------------------------------------------------------------
    Case("labels-missing", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         needle="l.csv"),
    Case("labels-unknown-key", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         files={"l.csv": "key,label\nnot-a-key,0\n"}, needle="not-a-key"),
    Case("labels-unknown-class", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         files={"l.csv": "key,label\n{first_key},zebra\n"}, needle="zebra"),
    Case("labels-empty", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         files={"l.csv": ""}, needle="empty"),
    Case("labels-not-utf8", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         files={"l.csv": b"key\n\xff\xfe\n"}, needle="UTF-8"),
    Case("labels-and-shots", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--shots", "1",
                              "--out", "{t}/o"], files={"l.csv": "key\n{first_key}\n"}, needle="not both"),
    Case("label-initial-no-key-column", ["label", "--init", "{init}", "--data", "{data}", "--initial", "{t}/i.csv", "--out", "{t}/o"],
         files={"i.csv": "name\nx\n"}, needle="key"),
    Case("label-initial-unknown-key", ["label", "--init", "{init}", "--data", "{data}", "--initial", "{t}/i.csv", "--out", "{t}/o"],
         files={"i.csv": "key\nnot-a-key\n"}, needle="not-a-key"),
    Case("label-resume-nothing", ["label", "--resume", "--out", "{t}/o"], needle="nothing to resume"),
    # -- outputs of another config ---------------------------------------------------------
    Case("out-of-another-seed", ["pretrain", "--data", "{data}", "--out", "{done}", *MOCO, "--seed", "1"], needle="seed 0 -> 1"),
    Case("out-with-foreign-files", ["pretrain", "--data", "{data}", "--out", "{t}/o", *MOCO], files={"o/notes.txt": "mine"},
         needle="holds no config.json"),
    # -- pipeline files (unsupft-ctl validate) ----------------------------------------------
    Case("yaml-alias-bomb", ["validate", "{t}/p.yaml"], files={"p.yaml": BOMB}, needle="aliases expanded", ctl=True),
    Case("yaml-recursive-alias", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: &s\n  x: *s\n"},
         needle="recursive alias", ctl=True),
    Case("yaml-deep-list", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: " + "[" * 5000 + "]" * 5000},
         needle="nested too deeply", ctl=True),
    Case("yaml-deep-100", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: " + "[" * 100 + "]" * 100},
         needle="nested deeper", ctl=True),
    Case("yaml-non-scalar-key", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\n? [a, b]\n: 1\nstages: {}\n"},
         needle="plain name", ctl=True),
    Case("yaml-not-utf8", ["validate", "{t}/p.yaml"], files={"p.yaml": b"name: p\xff\nstages: {}\n"}, needle="UTF-8", ctl=True),
    Case("yaml-python-tag", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: !!python/object/apply:os.system [ls]\nstages: {}\n"},
         needle="YAML", ctl=True),
    Case("yaml-duplicate-key", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nname: q\nstages: {}\n"},
         needle="duplicate", ctl=True),
    Case("yaml-empty", ["validate", "{t}/p.yaml"], files={"p.yaml": ""}, needle="mapping", ctl=True),
    Case("yaml-binary", ["validate", "{t}/p.yaml"], files={"p.yaml": b"\x00\x01\x02"}, needle="p.yaml", ctl=True),
    Case("yaml-too-large", ["validate", "{t}/p.yaml"], files={"p.yaml": "# " + "x" * (1 << 20) + "\n"}, needle="larger", ctl=True),
    Case("yaml-missing-file", ["validate", "{t}/none.yaml"], needle="none.yaml", ctl=True),
    Case("yaml-steps-abc", ["validate", "{t}/p.yaml"], files=pipe("steps: abc"), needle="steps", ctl=True),
    Case("yaml-steps-0", ["validate", "{t}/p.yaml"], files=pipe("steps: 0"), needle="1<=x", ctl=True),
    Case("yaml-steps-huge", ["validate", "{t}/p.yaml"], files=pipe("steps: 99999999999999999999"), needle="steps", ctl=True),
    Case("yaml-lr-1e999", ["validate", "{t}/p.yaml"], files=pipe("lr: 1e999"), needle="finite", ctl=True),
    Case("yaml-lr-nan", ["validate", "{t}/p.yaml"], files=pipe("lr: .nan"), needle="finite", ctl=True),
    Case("yaml-steps-bool", ["validate", "{t}/p.yaml"], files=pipe("steps: true"), needle="integer", ctl=True),
    Case("yaml-amp-off", ["validate", "{t}/p.yaml"], files=pipe("amp: off"), needle="quote it", ctl=True),
    Case("yaml-unknown-option", ["validate", "{t}/p.yaml"], files=pipe("colour: red"), needle="no option --colour", ctl=True),
    Case("yaml-overwrite", ["validate", "{t}/p.yaml"], files=pipe("overwrite: true"), needle="overwrite", ctl=True),
    Case("yaml-list-for-one", ["validate", "{t}/p.yaml"], files=pipe("steps: [1, 2]"), needle="one value", ctl=True),
    Case("ctl-bad-run-id", ["run", "{t}/p.yaml", "--run-id", "Bad_Id"], files=pipe("steps: 2"), needle="run-id", ctl=True),
    Case("ctl-max-parallel-0", ["run", "{t}/p.yaml", "--max-parallel", "0"], files=pipe("steps: 2"), needle="max-parallel", ctl=True),
]


# -- derived inputs (a copy of the shared data set or model, then damaged) --------------------------


def _copy_data(case_dir: Path, world: dict[str, str]) -> Path:
    target = case_dir / "d"
    shutil.copytree(world["data"], target)
    return target


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path, dict[str, str]], None]:
    def prepare(case_dir: Path, world: dict[str, str]) -> None:
        manifest = _copy_data(case_dir, world) / "dataset.json"
        raw = json.loads(manifest.read_text())
        edit(raw)
        manifest.write_text(json.dumps(raw))
    return prepare


def _shard_of(data: Path) -> Path:
    return data / json.loads((data / "dataset.json").read_text())["shards"][0]["name"]


def _tamper(case_dir: Path, world: dict[str, str]) -> None:
    """Flip one byte inside the first image's data: the tar still reads, its sha256 does not match."""
    shard = _shard_of(_copy_data(case_dir, world))
    blob = bytearray(shard.read_bytes())
    blob[512 + 40] ^= 0xFF
    shard.write_bytes(bytes(blob))


def _truncate_shard(case_dir: Path, world: dict[str, str]) -> None:
    shard = _shard_of(_copy_data(case_dir, world))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _png(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _truncate_model(case_dir: Path, world: dict[str, str]) -> None:
    blob = (Path(world["init"]) / "model.pt").read_bytes()
    (case_dir / "m").mkdir()
    (case_dir / "m" / "model.pt").write_bytes(blob[: len(blob) // 2])


def _model(arch: str, channels: int, image_size: int, claimed_arch: str | None = None) -> Callable[[Path, dict[str, str]], None]:
    """A valid checkpoint of `arch` (stored under the name `claimed_arch`, when given)."""

    def prepare(case_dir: Path, world: dict[str, str]) -> None:
        import torch

        from unsupft.models import build_backbone, save_model

        save_model(str(case_dir / "m" / "model.pt"), build_backbone(arch, channels), arch, channels, [image_size, image_size])
        if claimed_arch is not None:
            checkpoint = torch.load(case_dir / "m" / "model.pt", weights_only=True)
            checkpoint["arch"] = claimed_arch
            torch.save(checkpoint, case_dir / "m" / "model.pt")
    return prepare


SHARD = {"d/dataset.json": "{}"}
PRETRAIN_ON = lambda data: ["pretrain", "--data", data, "--out", "{t}/o", *MOCO]  # noqa: E731
ADAPT_FROM = ["adapt", "--init", "{t}/m", "--target", "{data}", "--out", "{t}/o", *MOCO]
TRANSFER_FROM = ["transfer", "--init", "{t}/m", "--train", "{data}", "--out", "{t}/o"]
LABEL_INITIAL = ["label", "--init", "{init}", "--data", "{data}", "--initial", "{t}/i.csv", "--out", "{t}/o"]
_BAD_NUMBERS = ("nan", "inf", "-inf", "-1", "1e30", "99999999999999999999")
# ingest's limits are upper bounds ("at most"), its --resize only shrinks: a huge value is no error
_HUGE_IS_VALID = {("ingest", "limit"), ("ingest", "shard_size"), ("ingest", "resize")}


def _numeric_options() -> list[tuple[str, str]]:
    """(stage, option) of every numeric option in the static option table, ingest's included."""
    from unsupft.options import load

    return [(stage, name) for stage, options in sorted(load().items()) for name, info in sorted(options.items())
            if info["type"]["name"] in ("integer", "integer range", "float", "number")]


def _stage_args(stage: str) -> list[str]:
    return [stage, "sklearn:digits", "{t}/o"] if stage == "ingest" else [stage]


CASES += [
    # -- every numeric option: NaN, infinities, negative, huge ----------------------------------
    *[Case(f"{stage}-{name}-{v}", [*_stage_args(stage), f"--{name.replace('_', '-')}", v], needle=name.replace("_", "-"))
      for stage, name in _numeric_options() for v in _BAD_NUMBERS
      if not (v == "99999999999999999999" and (stage, name) in _HUGE_IS_VALID)],
    # -- shards and manifests ----------------------------------------------------------------
    Case("shard-tampered", PRETRAIN_ON("{t}/d"), prepare=_tamper, needle="sha256"),
    Case("shard-truncated", PRETRAIN_ON("{t}/d"), prepare=_truncate_shard, needle="shard-"),
    Case("manifest-count-too-high", PRETRAIN_ON("{t}/d"), needle="dataset.json says",
         prepare=_edit_manifest(lambda m: (m["shards"][0].update(samples=m["shards"][0]["samples"] + 1),
                                           m.update(samples=m["samples"] + 1)))),
    Case("manifest-counts-do-not-add-up", PRETRAIN_ON("{t}/d"), needle="add up",
         prepare=_edit_manifest(lambda m: m.update(samples=m["samples"] + 5))),
    *[Case(f"manifest-shard-name-{kind}", PRETRAIN_ON("{t}/d"), needle="leaves the data set",
           prepare=_edit_manifest(lambda m, name=name: m["shards"][0].update(name=name)))
      for kind, name in [("dotdot", "../x.tar"), ("dotdot-inside", "a/../../x.tar"), ("absolute", "/etc/x.tar"),
                         ("s3-uri", "s3://other/x.tar"), ("file-uri", "file:///etc/x.tar")]],
    Case("manifest-shard-missing", PRETRAIN_ON("{t}/d"), needle="gone.tar",
         prepare=_edit_manifest(lambda m: m["shards"][0].update(name="gone.tar"))),
    Case("manifest-channels-2", PRETRAIN_ON("{t}/d"), needle="channels",
         prepare=_edit_manifest(lambda m: m.update(channels=2))),
    Case("manifest-format-other", PRETRAIN_ON("{t}/d"), needle="format",
         prepare=_edit_manifest(lambda m: m.update(format="other/9"))),
    Case("manifest-sha-missing", PRETRAIN_ON("{t}/d"), needle="dataset.json",
         prepare=_edit_manifest(lambda m: m["shards"][0].pop("sha256"))),
    Case("manifest-samples-string", PRETRAIN_ON("{t}/d"), needle="dataset.json",
         prepare=_edit_manifest(lambda m: m.update(samples="many"))),
    Case("pattern-names-missing-shard", PRETRAIN_ON("{t}/f-{{000000..000002}}.tar"), needle="does not exist",
         files={"f-000000.tar": _tar({"a.png": _png(8), "a.cls": b"0"})}),
    Case("pattern-matches-nothing", PRETRAIN_ON("{t}/none-{{0..1}}.tar"), needle="does not exist"),
    Case("folder-without-tars", PRETRAIN_ON("{t}/f"), files={"f/readme.txt": "hello"}, needle="not a data set"),
    Case("tar-missing", PRETRAIN_ON("{t}/gone.tar"), needle="no such shard"),
    Case("tar-no-image-member", PRETRAIN_ON("{t}/f.tar"), files={"f.tar": _tar({"a.txt": b"caption", "a.cls": b"0"})},
         needle="image member"),
    Case("tar-empty", PRETRAIN_ON("{t}/f.tar"), files={"f.tar": _tar({})}, needle="f.tar"),
    Case("tar-not-a-tar", PRETRAIN_ON("{t}/f.tar"), files={"f.tar": b"\x89PNG not a tar at all" * 40}, needle="f.tar"),
    Case("tar-truncated", PRETRAIN_ON("{t}/f.tar"), files={"f.tar": _tar({"a.png": _png(64), "b.png": _png(64)})[:1100]},
         needle="f.tar"),
    Case("tar-image-not-decodable", PRETRAIN_ON("{t}/f.tar"), files={"f.tar": _tar({"a.png": b"not a png", "a.cls": b"0"})},
         needle="decodable"),
    Case("tar-mixed-sizes-no-image-size", PRETRAIN_ON("{t}/f.tar"),
         files={"f.tar": _tar({"a.png": _png(8), "b.png": _png(12), "c.png": _png(8)})}, needle="image-size"),
    # -- checkpoints ----------------------------------------------------------------------------
    Case("init-truncated", ADAPT_FROM, prepare=_truncate_model, needle="model.pt"),
    Case("init-random-bytes", TRANSFER_FROM, files={"m/model.pt": random.Random(0).randbytes(4096)}, needle="model.pt"),
    Case("init-zip-not-torch", TRANSFER_FROM, files={"m/model.pt": b"PK\x03\x04" + bytes(200)}, needle="model.pt"),
    Case("init-other-arch-state", ADAPT_FROM, prepare=_model("tiny", 1, 8, claimed_arch="resnet18"), needle="model.pt"),
    Case("init-unknown-arch", TRANSFER_FROM, prepare=_model("tiny", 1, 8, claimed_arch="vit_h"), needle="vit_h"),
    # (a checkpoint with another channel count is no error: its stem is adapted, models/io.py `_adapt_stem`)
    Case("init-resnet-state-claims-tiny", TRANSFER_FROM, prepare=_model("resnet18", 1, 8, claimed_arch="tiny"), needle="model.pt"),
    # -- labels files for `label --initial` ----------------------------------------------------
    Case("label-initial-unknown-class", LABEL_INITIAL, files={"i.csv": "key,label\n{first_key},zebra\n"}, needle="zebra"),
    Case("label-initial-duplicate-key", LABEL_INITIAL, files={"i.csv": "key\n{first_key}\n{first_key}\n"}, needle="duplicate"),
    Case("label-initial-not-utf8", LABEL_INITIAL, files={"i.csv": b"key\n\xff\xfe\x00\n"}, needle="i.csv"),
    Case("label-initial-empty", LABEL_INITIAL, files={"i.csv": ""}, needle="i.csv"),
    Case("label-initial-missing", LABEL_INITIAL, needle="i.csv"),
    Case("labels-duplicate-key", ["transfer", "--init", "{init}", "--train", "{data}", "--labels", "{t}/l.csv", "--out", "{t}/o"],
         files={"l.csv": "key,label\n{first_key},0\n{first_key},1\n"}, needle="twice"),
    # -- pipeline files ------------------------------------------------------------------------
    Case("yaml-tab-indent", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages:\n\ta: {kind: pretrain}\n"},
         needle="p.yaml", ctl=True),
    Case("yaml-unclosed-bracket", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: {a: [1, 2\n"},
         needle="p.yaml", ctl=True),
    Case("yaml-duplicate-stage", ["validate", "{t}/p.yaml"],
         files={"p.yaml": "name: p\nstages:\n  a: {kind: pretrain, data: [/x]}\n  a: {kind: pretrain, data: [/y]}\n"},
         needle="duplicate", ctl=True),
    Case("yaml-two-documents", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: {}\n---\nname: q\n"},
         needle="p.yaml", ctl=True),
    Case("yaml-utf16", ["validate", "{t}/p.yaml"], files={"p.yaml": "name: p\nstages: {}\n".encode("utf-16")},
         needle="p.yaml", ctl=True),
    Case("yaml-a-list", ["validate", "{t}/p.yaml"], files={"p.yaml": "- a\n- b\n"}, needle="mapping", ctl=True),
    *[Case(f"yaml-{opt}-{tag}", ["validate", "{t}/p.yaml"], files=pipe(f"{opt}: {v}"),
           needle=f"p.yaml:4: stages.a.{opt.replace('-', '_')}", ctl=True)  # file:line of the value
      for opt, tag, v in [("lr", "neg", "-1"), ("lr", "inf", ".inf"), ("temperature", "zero", "0"), ("queue-size", "huge", "1000000000"),
                          ("batch-size", "neg", "-5"), ("image-size", "huge", "100000"), ("seed", "neg", "-1"),
                          ("key-momentum", "nan", ".nan"), ("epochs", "inf", ".inf"), ("workers", "string", "many")]],
]


def _tree(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for root in roots if root.exists() for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """A data set, a model and a finished output shared by every case (and checked unchanged)."""
    from unsupft.models import build_backbone, save_model

    root = tmp_path_factory.mktemp("corpus")
    runner = CliRunner()
    result = runner.invoke(unsupft_main, ["ingest", "sklearn:digits", str(root / "data"), "--classes", "0,1,2", "--limit", "60"])
    assert result.exit_code == 0, result.output
    save_model(str(root / "init" / "model.pt"), build_backbone("tiny", 1), "tiny", 1, [8, 8])
    result = runner.invoke(unsupft_main, ["pretrain", "--data", str(root / "data"), "--out", str(root / "done"), *MOCO])
    assert result.exit_code == 0, result.output
    from unsupft.data import load_arrays

    first_key = load_arrays(str(root / "data")).keys[0]
    return {"root": str(root), "data": str(root / "data"), "init": str(root / "init"), "done": str(root / "done"),
            "first_key": first_key}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Case, world, tmp_path, request, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNSUPFT_STORE_RETRY_SECONDS", "2")
    values = {**world, "t": str(tmp_path / "case"), "s3": ""}
    if case.s3:
        values["s3"] = request.getfixturevalue("s3_uri")
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for name, content in case.files.items():
        target = case_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.replace("{first_key}", values["first_key"]).replace("{t}", values["t"]).replace("{data}", values["data"])
            content = content.encode()
        target.write_bytes(content)
    if case.prepare is not None:
        case.prepare(case_dir, world)
    before = _tree(Path(world["root"]), tmp_path)
    args = [a.format(**values) for a in case.args]
    result = CliRunner().invoke(ctl_main if case.ctl else unsupft_main, args)
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert case.needle in errors[0], errors[0]
    assert _tree(Path(world["root"]), tmp_path) == before  # nothing written or changed
    if case.s3:
        assert store.list_prefix(values["s3"]) == []
