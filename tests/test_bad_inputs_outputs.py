"""Bad input around outputs, disks and training (issue 24 cases 3, 5, 6, 7 and parts of 12), beside
the corpus of tests/test_bad_inputs.py and with its `world` (a digits data set, a tiny model and a
finished pretrain output, shared by the module).

Each refused case asserts its exit code, exactly one `error:` line, no traceback, and that nothing
was written (exit 2) or deleted that unsupft did not write. Full disks and read-only outputs are
real tmpfs mounts (as root; skipped, saying why, where mounting is not permitted), unmounted after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch
from click.testing import CliRunner, Result

from tests.test_bad_inputs import MOCO, _tree, world  # noqa: F401  (world: the shared module fixture)
from unsupft import stage, store
from unsupft.cli import main as unsupft_main
from unsupft.errors import EXIT_INFRA

pytestmark = pytest.mark.usefixtures("one_thread")  # small training steps on a shared 2-core machine


def invoke(*args: object) -> Result:
    return CliRunner().invoke(unsupft_main, [str(a) for a in args])


def one_error(result: Result, code: int) -> str:
    """The one `error:` line of a run that ended with `code` and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def refused(world: dict[str, str], *args: object, watch: tuple[Path, ...] = ()) -> str:
    """Run a stage that must refuse its input: exit 2, one line, nothing written or changed under the
    shared world or `watch`. Returns the error line."""
    roots = (Path(world["root"]), *watch)
    before = _tree(*roots)
    line = one_error(invoke(*args), 2)
    assert _tree(*roots) == before
    return line


def succeeded(*args: object) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def snapshot(uri: str) -> dict[str, bytes]:
    return {name: store.read_bytes(store.join(uri, name)) for name in store.list_prefix(uri)}


# -- case 3: --overwrite deletes only what unsupft wrote ----------------------------------------------


def test_overwrite_refuses_a_folder_unsupft_did_not_create(world, store_uri):
    # The case: a folder of the user's files (no config.json), `--out it --overwrite`,
    # deleted them all, and the refusal without --overwrite suggested it. A mistyped `--out ~` or a
    # bucket root is such a folder.
    mine = store.join(store_uri, "home")
    for name in ("notes.txt", *(f"photos/{i}.jpg" for i in range(5))):
        store.write_text(store.join(mine, name), f"the user's {name}")
    before = snapshot(mine)
    pretrain = ["pretrain", "--data", world["data"], "--out", mine, *MOCO]
    line = one_error(invoke(*pretrain), 2)
    assert "holds no config.json" in line and "6 files: notes.txt, photos/0.jpg" in line and "--overwrite" not in line
    line = one_error(invoke(*pretrain, "--overwrite"), 2)
    assert "6 files: notes.txt, photos/0.jpg, photos/1.jpg and 3 more" in line, line
    assert "--overwrite deletes only what unsupft wrote" in line and "use another --out" in line
    assert snapshot(mine) == before  # nothing deleted, nothing written (not even a lease)


def test_overwrite_refuses_another_tools_config_json(world, tmp_path):
    # A folder with a config.json is not necessarily a stage output (a Hugging Face model has one).
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    (model / "model.safetensors").write_bytes(b"weights")
    line = refused(world, "pretrain", "--data", world["data"], "--out", model, *MOCO, "--overwrite", watch=(tmp_path,))
    assert "config.json no unsupft stage wrote" in line and "2 files" in line


def test_overwrite_replaces_another_configs_output_but_not_the_users_files_in_it(world, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(world["done"], out)
    (out / "notes.txt").write_text("mine")
    args = ["pretrain", "--data", world["data"], "--out", out, *MOCO, "--seed", "1"]
    line = refused(world, *args, "--overwrite", watch=(tmp_path,))
    assert "another config (seed 0 -> 1)" in line and "did not write (1 file: notes.txt)" in line
    assert "--overwrite deletes only" in line
    line = refused(world, *args, watch=(tmp_path,))
    assert "notes.txt" in line and "or --overwrite" not in line  # it would not help

    (out / "notes.txt").unlink()
    line = refused(world, *args, watch=(tmp_path,))
    assert line.endswith("use another --out, or --overwrite to replace it")  # here it helps
    succeeded(*args, "--overwrite")
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # the seed-0 run's events went too


@pytest.fixture(scope="module")
def stage_outputs(world) -> dict[str, Path]:
    """Finished outputs of the stages the cases below need anyway: transfer (with --test),
    bn-adapt and evaluate, beside world's pretrain."""
    root = Path(world["root"]) / "stages"
    outs = {"pretrain": Path(world["done"]), "transfer": root / "transfer", "bn-adapt": root / "bn",
            "evaluate": root / "eval"}
    succeeded("transfer", "--init", world["init"], "--train", world["data"], "--test", world["data"], "--epochs", 1,
              "--out", outs["transfer"])
    succeeded("bn-adapt", "--init", world["init"], "--data", world["data"], "--batch-size", 59, "--out", outs["bn-adapt"])
    succeeded("evaluate", "--model", f"m={outs['transfer']}", "--train", world["data"], "--test", world["data"],
              "--metrics", "classifier,retrieval,map", "--out", outs["evaluate"])
    return outs


def test_every_file_the_stages_write_is_one_overwrite_may_delete(stage_outputs):
    # `stage.WRITTEN` names what the stages write; a name missing there would make --overwrite
    # refuse that stage's output (never delete a file of the user's), and _DONE.json lists them all.
    for name, out in stage_outputs.items():
        files = store.list_prefix(str(out))
        assert [f for f in files if not stage.written_by_unsupft(f)] == [], name
        listed = json.loads((out / stage.DONE).read_text())["outputs"]
        assert sorted(listed) == sorted(set(files) - {stage.DONE, "_LEASE.json"}), name
    assert not stage.written_by_unsupft("labels/round-1.csv")  # a person's answers
    assert not stage.written_by_unsupft("photos/model.pt.jpg") and not stage.written_by_unsupft("notes.txt")


# -- case 5: full disks and read-only outputs -------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the test (unmounted after); skips where mounting is
    not permitted (not root, or a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".tmp-*")]


def test_full_disk_in_pretrain_is_exit_69_and_the_rerun_resumes(world, tmp_path):
    # Each tiny checkpoint is about 4 MB: 6 MB hold the first, not the temp file of the second.
    args = ["pretrain", "--data", world["data"], *MOCO[:1], "4", *MOCO[2:], "--checkpoint-every", "2"]
    with tmpfs(tmp_path / "disk", "6m") as disk:
        out = disk / "o"
        line = one_error(invoke(*args, "--out", out), EXIT_INFRA)
        assert line == (f"error: {out / 'checkpoint.pt'}: no space left on the device; free some space and run "
                        f"the same command again (nothing was half-written)")
        assert no_temp_files(out)  # the failed write's temp file is gone
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # the last good one, whole
        remount(disk, "size=32m")  # space freed
        resumed = succeeded(*args, "--out", out)
        assert (out / stage.DONE).exists() and no_temp_files(out)
        resumed_model = torch.load(out / "model.pt", weights_only=True)["backbone"]
    assert "Traceback" not in resumed.output
    succeeded(*args, "--out", tmp_path / "whole")  # the same run without a full disk
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["backbone"]
    assert all(torch.equal(whole[k], resumed_model[k]) for k in whole)


def test_full_disk_in_ingest_is_exit_69_and_leaves_nothing(tmp_path):
    args = ["ingest", "sklearn:digits", "--limit", "600", "--shard-size", "100"]
    with tmpfs(tmp_path / "disk", "100k") as disk:
        line = one_error(invoke(*args[:2], disk / "d", *args[2:]), EXIT_INFRA)
        assert f"{disk / 'd'}/shard-" in line and "no space left on the device" in line
        assert [p for p in disk.rglob("*") if p.is_file()] == []  # no shard, no temp file, no manifest
        remount(disk, "size=8m")
        succeeded(*args[:2], disk / "d", *args[2:])
        assert (disk / "d" / "dataset.json").exists()


def test_read_only_output_is_exit_2_and_writes_nothing(world, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        (disk / "old.txt").write_text("kept")
        remount(disk, "ro")
        line = refused(world, "pretrain", "--data", world["data"], "--out", disk / "o", *MOCO, watch=(disk,))
        assert line == f"error: {disk / 'o' / '_LEASE.json'}: read-only file system"
        line = refused(world, "ingest", "sklearn:digits", disk / "d", "--limit", "20", watch=(disk,))
        assert "read-only file system" in line
        remount(disk, "rw")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_output_without_write_permission_is_exit_2(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        line = refused(world, "pretrain", "--data", world["data"], "--out", locked / "o", *MOCO, watch=(tmp_path,))
        assert "permission denied" in line
    finally:
        locked.chmod(0o755)


# -- case 6: batches BatchNorm cannot train on -------------------------------------------------------

ONE = ["--batch-size", "1"]


@pytest.mark.parametrize("stage_args", [
    ["pretrain", "--data", "{data}", *MOCO[:2], "--queue-size", "32", "--workers", "0", *ONE],
    ["adapt", "--init", "{init}", "--target", "{data}", *MOCO[:2], "--workers", "0", *ONE],
    ["transfer", "--init", "{init}", "--train", "{data}", *ONE],
    ["transfer", "--init", "{init}", "--train", "{data}", "--method", "bituning", *ONE],
    ["bn-adapt", "--init", "{init}", "--data", "{data}", *ONE],
    ["evaluate", "--model", "m={init}", "--train", "{data}", "--test", "{data}", *ONE],
    ["semi", "--init", "{init}", "--train", "{data}", "--unlabeled", "{data}", "--unlabeled-weight", "0", *ONE],
    ["select-source", "--init", "{init}", "--candidate", "a={data}", "--candidate", "b={data}", "--probe-train", "{data}",
     *ONE],
], ids=["pretrain", "adapt", "transfer", "transfer-bituning", "bn-adapt", "evaluate", "semi-supervised-only",
        "select-source"])
def test_batch_of_one_is_refused_before_anything_is_written(world, tmp_path, stage_args):
    args = [a.format(**world) for a in stage_args]
    line = refused(world, *args, "--out", tmp_path / "o", watch=(tmp_path,))
    assert line.startswith("error: --batch-size 1: BatchNorm trains on batches of at least 2 images"), line


def test_linear_transfer_trains_on_batches_of_one(world, tmp_path):
    # The backbone (and its BatchNorm) is frozen in eval mode: only the classifier trains.
    succeeded("transfer", "--init", world["init"], "--train", world["data"], "--method", "linear", *ONE,
              "--shots", 2, "--epochs", 1, "--out", tmp_path / "o")


def test_one_labeled_image_trains_on_two_views_of_it(world, tmp_path):
    # A --labels file with one key (and --shots 1 on a one-class set) gave a batch of one image.
    (tmp_path / "one.csv").write_text(f"key\n{world['first_key']}\n")
    out = tmp_path / "o"
    succeeded("transfer", "--init", world["init"], "--train", world["data"], "--labels", tmp_path / "one.csv",
              "--epochs", 2, "--out", out)
    assert (out / "train_keys.txt").read_text() == f"{world['first_key']}\n"
    one_class = tmp_path / "zeros"
    succeeded("ingest", "sklearn:digits", one_class, "--classes", "0", "--limit", "5")
    succeeded("transfer", "--init", world["init"], "--train", one_class, "--shots", 1, "--epochs", 1,
              "--out", tmp_path / "shot")


def test_bn_adapt_leaves_out_a_last_batch_of_one_and_refuses_a_single_image(world, stage_outputs, tmp_path):
    # 60 images in batches of 59: the last batch held one image (a traceback and a partial output).
    metrics = json.loads((stage_outputs["bn-adapt"] / "metrics.jsonl").read_text())
    assert metrics["samples"] == 59
    single = tmp_path / "single"
    succeeded("ingest", "sklearn:digits", single, "--limit", "1")
    line = refused(world, "bn-adapt", "--init", world["init"], "--data", single, "--out", tmp_path / "o",
                   watch=(tmp_path,))
    assert line == f"error: {single}: holds 1 image; BatchNorm statistics need at least 2"


# -- case 12: a batch larger than the data set ------------------------------------------------------


def test_moco_batch_larger_than_the_data_set_is_one_epoch_and_says_so(world, tmp_path):
    # 60 images, --batch-size 256 (the default): batches held images up to 5 times, without a word.
    out = tmp_path / "o"
    result = succeeded("pretrain", "--data", world["data"], "--steps", 1, "--workers", 0, "--out", out)
    assert ("warning: --batch-size 256 is larger than the data set's epoch (60 samples): batches of 60, so that "
            "no image repeats within a batch") in result.output
    resolved = json.loads((out / "config.json").read_text())["resolved"]
    assert resolved["batch_size"] == 60 and resolved["lr"] == pytest.approx(0.03 * 60 / 256)
    assert "larger than the data set" in resolved["batch_size_reason"] and resolved["queue_size"] == 60


# -- case 7 and 12: weights that are not usable --------------------------------------------------------


def _weights(tmp_path: Path, name: str, edit) -> Path:
    """A tiny model's backbone state with one tensor changed by `edit`, saved as `name`."""
    from safetensors.torch import save_file

    from unsupft.models import build_backbone, save_model

    backbone = build_backbone("tiny", 1)
    path = tmp_path / "m" / name
    if name.endswith(".safetensors"):
        state = dict(backbone.state_dict())
        state["layer1.0.conv1.weight"] = edit(state["layer1.0.conv1.weight"])
        path.parent.mkdir()
        save_file(state, str(path))
    else:
        with torch.no_grad():
            backbone.conv1.weight.copy_(edit(backbone.conv1.weight))
        save_model(str(path), backbone, "tiny", 1, [8, 8])
    return path


@pytest.mark.parametrize("name,edit,needle", [
    ("model.pt", lambda w: w.index_fill(0, torch.tensor([0]), float("nan")), "'conv1.weight' holds NaN or infinite"),
    ("model.pt", lambda w: w.index_fill(0, torch.tensor([1]), float("-inf")), "'conv1.weight' holds NaN or infinite"),
    ("w.safetensors", lambda w: w.round().to(torch.int64), "'layer1.0.conv1.weight' holds int64 values"),
    ("w.safetensors", lambda w: w > 0, "'layer1.0.conv1.weight' holds bool values"),
], ids=["nan", "inf", "int64", "bool"])
def test_unusable_weights_are_refused_where_they_load(world, tmp_path, name, edit, needle):
    # NaN weights: evaluate ended in a faiss RuntimeError traceback; as transfer's --init it blamed
    # the learning rate and left config.json, _LEASE.json, metrics.jsonl and an events file.
    model = _weights(tmp_path, name, edit)
    arch = ["--arch", "tiny"] if name.endswith(".safetensors") else []
    for args in (["transfer", "--init", model, "--train", world["data"], *arch],
                 ["evaluate", "--model", f"m={model}", "--train", world["data"], "--test", world["data"], *arch]):
        line = refused(world, *args, "--out", tmp_path / "o", watch=(tmp_path,))
        assert line.startswith(f"error: {model}: tensor ") and needle in line, line


def test_integer_buffers_of_a_safetensors_file_load(tmp_path):
    # BatchNorm's num_batches_tracked is int64 in the model too: such a file is weights.
    from unsupft.models import load_backbone

    model = _weights(tmp_path, "w.safetensors", lambda w: w)
    backbone, _ = load_backbone(str(model), arch="tiny")
    assert backbone.bn1.num_batches_tracked.dtype == torch.int64


# -- case 12: an empty --out ------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["pretrain", "--data", "{data}", *MOCO, "--out", ""],
                                  ["ingest", "sklearn:digits", ""]], ids=["pretrain", "ingest"])
def test_empty_out_is_refused_not_the_current_directory(world, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)  # where an empty --out used to write
    line = refused(world, *[a.format(**world) for a in args], watch=(tmp_path,))
    assert "empty; give the output's path or URI" in line and list(tmp_path.iterdir()) == []
