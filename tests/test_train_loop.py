"""The training loop: optimisation, schedule, weight-decay groups, checkpoint/resume, metrics."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from unsupft.models import build_backbone
from unsupft.train.batches import LoaderBatches, StepBatchSampler, Shuffled
from unsupft.train.loop import LoopConfig, TrainTask, lr_factor, train, unwrap
from unsupft.seeding import seed_everything


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return images, torch.tensor(y)


class Classify(TrainTask):
    def __init__(self, frozen_stem: bool = False) -> None:
        backbone = build_backbone("tiny", 1)
        if frozen_stem:
            backbone.conv1.requires_grad_(False)
        self.model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, 10))
        self.seen: list[int] = []

    def training_step(self, batch, step):
        self.seen.append(step)
        images, labels = batch
        logits = self.model(images)
        return F.cross_entropy(logits, labels), {"acc": (logits.argmax(1) == labels).float().mean()}


def digit_batches(digits, batch_size=32, seed=0, workers=0):
    images, labels = digits
    return LoaderBatches(lambda i: (images[i] + 0.05 * torch.randn_like(images[i]), labels[i]),
                         len(images), batch_size, seed, num_workers=workers)


def config(tmp_path, **kw):
    return LoopConfig(**{"out": str(tmp_path), "steps": 30, "lr": 0.1, "warmup_steps": 3, "log_every": 5,
                         "progress": False, **kw})


def test_training_lowers_the_loss_and_logs_metrics(tmp_path, digits):
    seed_everything(0)
    task = Classify()
    result = train(task, digit_batches(digits), config(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert {"lr", "acc", "samples_per_s"} <= set(records[0])
    assert result.step == 30 and result.resumed_from is None
    assert task.seen == list(range(30)) and (tmp_path / "checkpoint.pt").exists()
    again = Classify()
    assert train(again, digit_batches(digits), config(tmp_path)).resumed_from == 30
    assert again.seen == []  # a finished run does nothing more


class Interrupt(Exception):
    pass


class Interrupted(LoaderBatches):
    """Stops the process-equivalent of a kill right before step `at`."""

    def __init__(self, inner: LoaderBatches, at: int) -> None:
        self.inner, self.at = inner, at

    def batches(self, start_step, steps, rank=0, world_size=1):
        for step, batch in zip(range(start_step, steps), self.inner.batches(start_step, steps, rank, world_size)):
            if step == self.at:
                raise Interrupt
            yield batch


def test_resume_continues_the_same_run(tmp_path, digits):
    seed_everything(0)
    whole = Classify()
    train(whole, digit_batches(digits), config(tmp_path / "whole", steps=20, checkpoint_every=8))

    seed_everything(0)
    first = Classify()
    with pytest.raises(Interrupt):
        train(first, Interrupted(digit_batches(digits), at=13), config(tmp_path / "split", steps=20, checkpoint_every=8))
    seed_everything(123)  # a fresh process: different init, everything must come from the checkpoint
    second = Classify()
    result = train(second, digit_batches(digits, workers=1), config(tmp_path / "split", steps=20, checkpoint_every=8))
    assert result.resumed_from == 8 and second.seen == list(range(8, 20))
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]  # the record of step 10 (past the checkpoint) is not repeated


def read_scalars(out: str, tag: str) -> dict[int, list[float]]:
    """The `tag` scalars TensorBoard would show, per step, from the event files in `out`, parsed
    from their TFRecord framing; a session start (a resume's purge_step)
    drops the events at and past its step, as TensorBoard does."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX not installed")
    from unsupft import store

    scalars: dict[int, list[float]] = {}
    for name in sorted(n for n in store.list_prefix(out) if n.startswith("events.out.tfevents.")):
        data, pos = store.read_bytes(store.join(out, name)), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                scalars = {step: v for step, v in scalars.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    scalars.setdefault(event.step, []).append(value.simple_value)
    return scalars


def test_tensorboard_scalars_are_the_metrics_lines_across_a_resume(store_uri, digits):
    pytest.importorskip("tensorboardX", reason="tensorboardX not installed (pip install unsupft[tensorboard])")
    from unsupft import store

    seed_everything(0)
    with pytest.raises(Interrupt):
        train(Classify(), Interrupted(digit_batches(digits), at=13), config(store_uri, steps=20, checkpoint_every=8))
    assert read_scalars(store_uri, "loss").keys() == {5, 10}
    train(Classify(), digit_batches(digits), config(store_uri, steps=20, checkpoint_every=8))
    records = [json.loads(x) for x in store.read_text(store.join(store_uri, "metrics.jsonl")).splitlines()]
    for tag in ("loss", "acc", "lr", "samples_per_s"):  # the resumed run's step 10 replaces the first run's
        shown = read_scalars(store_uri, tag)
        assert shown.keys() == {5, 10, 15, 20} and all(len(values) == 1 for values in shown.values()), shown
        assert {step: values[0] for step, values in shown.items()} == pytest.approx(
            {r["step"]: r[tag] for r in records}, rel=1e-6)


def test_frozen_parameters_and_no_weight_decay_on_bn_and_bias(tmp_path, digits):
    seed_everything(0)
    task = Classify(frozen_stem=True)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    # lr 0 isolates weight decay: only decayed parameters move (SGD: p -= lr*wd*p is 0 too), so use
    # a tiny lr with a huge decay and compare relative changes.
    train(task, digit_batches(digits), config(tmp_path, steps=3, warmup_steps=0, lr=1e-6, weight_decay=1e3, schedule="constant",
                                              momentum=0.0))
    after = {k: v.cpu() for k, v in task.model.state_dict().items()}  # on CUDA the model stays there
    assert torch.equal(before["0.conv1.weight"], after["0.conv1.weight"])  # frozen
    shrink = lambda k: (after[k].norm() / before[k].norm()).item()  # noqa: E731
    assert shrink("0.layer1.0.conv1.weight") < 0.998  # decayed: (1 - 1e-3) per step
    assert abs(shrink("0.bn1.weight") - 1) < 1e-4 and abs(shrink("1.bias") - 1) < 1e-2  # not decayed


def test_param_groups_keep_their_own_learning_rates(tmp_path, digits):
    class TwoRates(Classify):
        def param_groups(self):
            m = unwrap(self.model)
            return [{"params": m[1].parameters(), "lr": 3.0, "weight_decay": 0.0},
                    {"params": m[0].parameters(), "lr": 1e-4, "weight_decay": 0.0}]

    seed_everything(0)
    task = TwoRates()
    cfg = config(tmp_path, steps=4, warmup_steps=0, schedule="constant", log_every=1)
    train(task, digit_batches(digits), cfg)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [3.0] * 4  # the first group's lr is reported


def test_lr_schedule():
    cfg = LoopConfig(out="", steps=110, lr=1.0, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(109, cfg) < 1e-3


def test_batches_are_a_function_of_the_step():
    sampler = StepBatchSampler(Shuffled(10, seed=1), batch_size=4, steps=10, seed=1)
    all_steps = list(sampler)
    late = StepBatchSampler(Shuffled(10, seed=1), batch_size=4, steps=10, seed=1, start_step=6)
    assert list(late) == all_steps[6:]
    indices = [i for batch in all_steps[:5] for i, _ in batch]  # 20 positions = two epochs of 10
    assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))
    ranks = [StepBatchSampler(Shuffled(10, seed=1), 2, 10, 1, rank=r, world_size=2).batch(0) for r in (0, 1)]
    assert ranks[0] + ranks[1] == all_steps[0]  # two ranks of 2 split one global batch of 4


def test_more_local_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU node: rank 1 must not die on a missing cuda:1."""
    from unsupft.errors import UserError
    from unsupft import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="local rank 1 has no GPU: 1 visible"):
        distributed.setup()


def test_sample_randomness_is_a_function_of_the_step_alone():
    """Per-sample seeds: the same step gets the same random draws with any worker count and any
    caller RNG state, and drawing samples leaves the caller's RNG where it was."""
    source = LoaderBatches(lambda i: torch.rand(3) + i, 10, batch_size=4, seed=7)
    torch.manual_seed(0)
    first = list(source.batches(2, 4))
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # the loader drew nothing from the caller's generator
    source.num_workers = 2
    again = list(source.batches(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 2
    assert not torch.equal(first[0], first[1])  # different steps, different draws


def test_terminal_bar_shows_elapsed_eta_and_epoch(tmp_path, digits, capsys):
    """On a terminal: tqdm's bar with elapsed/remaining time, the epoch and the loss, not JSON."""
    seed_everything(0)
    train(Classify(), digit_batches(digits, batch_size=32), config(tmp_path, steps=10, log_every=5, progress=True))
    captured = capsys.readouterr()
    assert captured.out == ""  # no JSON lines on a terminal
    final = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    n = len(digits[0])
    # e.g. "100%|██████████| 10/10 [00:01<00:00,  7.1step/s, epoch=0.53/0.53, lr=0.01, loss=2.1, acc=0.3]"
    assert re.search(r"10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(step/s|s/step), epoch=", final), final
    assert f"epoch={10 * 32 / n:.2f}/{10 * 32 / n:.2f}" in final and "loss=" in final
    config_json = config(tmp_path / "json", steps=10, log_every=5, progress=None)
    train(Classify(), digit_batches(digits, batch_size=32), config_json)  # stderr is no terminal here
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["step"] for line in lines] == [5, 10]


class DivergesAt(Classify):
    """Classify whose loss turns NaN from step `bad` on (as a too-high learning rate does)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def training_step(self, batch, step):
        loss, metrics = super().training_step(batch, step)
        return (loss * float("nan") if step >= self.bad else loss), metrics


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint_before_it(tmp_path, digits):
    from unsupft import checkpoint
    from unsupft.errors import UserError

    cfg = config(tmp_path, checkpoint_every=4, log_every=10)
    seed_everything(0)
    with pytest.raises(UserError) as exc:
        train(DivergesAt(bad=5), digit_batches(digits), cfg)
    message = str(exc.value)
    assert "\n" not in message and "NaN or infinite at step 5" in message and "learning rate" in message
    assert "from step 4 is kept" in message
    kept = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    assert kept["step"] == 4  # the checkpoint due at step 8 was not written over it with NaN weights
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    resumed = Classify()
    result = train(resumed, digit_batches(digits), cfg)  # resumable: continues from step 4
    assert result.resumed_from == 4 and resumed.seen[0] == 4
