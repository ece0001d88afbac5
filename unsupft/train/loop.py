"""The one training loop of every stage (pretrain, adapt, transfer, label's finetuning).

A stage describes *what* to train; `train` does the rest: device, DDP, bf16 autocast, optimizer,
learning-rate schedule, checkpoint/resume, metrics and progress.

API
---
::

    from unsupft.train.loop import LoopConfig, TrainTask, train
    from unsupft.seeding import seed_everything

    class MyTask(TrainTask):
        def __init__(self, backbone, fc):
            self.model = nn.Sequential(backbone, fc)  # required; its forward is what DDP wraps

        def param_groups(self):                      # optional; default: every trainable param at cfg.lr
            m = unwrap(self.model)
            return [{"params": m[1].parameters(), "lr": 3.0, "weight_decay": 0.0},
                    {"params": m[0].parameters(), "lr": 1e-4, "weight_decay": 0.0}]

        def training_step(self, batch, step):        # required
            images, labels = batch                   # already on self.device
            logits = self.model(images)              # call self.model (the DDP wrapper under DDP)
            loss = F.cross_entropy(logits, labels)
            return loss, {"acc": (logits.argmax(1) == labels).float().mean()}

        def extra_state(self): return {}             # optional: more state to checkpoint (e.g. a queue
        def load_extra_state(self, state): pass      #   kept outside model buffers)

    seed_everything(cfg.seed)                        # before building the model: seeded init
    batches = LoaderBatches(sample_fn, n, batch_size=256, seed=cfg.seed)  # unsupft.train.batches
    result = train(MyTask(...), batches, LoopConfig(out=out_uri, steps=1000, lr=0.03))
    # result.step, result.resumed_from (None or the checkpoint step), result.metrics (last record)

- `task.model` (nn.Module) holds every weight that trains or is checkpointed (buffers such as
  BatchNorm statistics and the MoCo queue included). The loop moves it to the device (and to
  channels-last), calls `.train()` once, and under DDP replaces `task.model` by its
  `DistributedDataParallel` wrapper while training (restored afterwards): `training_step` must
  run the model through `self.model(...)` (its `forward`) so gradients are synchronised. Reach
  sub-modules through `unwrap(self.model)`. `task.device` is set to the training device.
- `param_groups()` returns torch-style groups; `"lr"` is a group's peak learning rate
  (default `cfg.lr`), `"weight_decay"` its decay (default `cfg.weight_decay`). Each group is split
  so that BatchNorm and bias parameters (ndim <= 1) get no weight decay. Parameters with
  `requires_grad=False` are left out (that is how frozen parts stay frozen).
- `training_step(batch, step)` runs under autocast (bf16 when enabled) and returns the loss (a
  scalar tensor) and a dict of scalar metrics (floats or 0-d tensors). The loop calls `backward`,
  steps the optimizer (SGD), and sets every group's lr for the next step. `step` counts from 0 and
  is never repeated or skipped across a resume.
- Batches: `data` is a *BatchSource*, an object with
  `batches(start_step, steps, rank, world_size) -> iterator of batches` that yields exactly the
  batches of steps `start_step..steps-1` for this rank (see `unsupft.train.batches.LoaderBatches`,
  which does this deterministically, so a resumed run sees the same data as an uninterrupted one). A
  batch may be a tensor or any nesting of tuples/lists/dicts of tensors; tensors are moved to the
  device (4-d float tensors to channels-last).
- Schedule: linear warm-up over `warmup_steps` from lr/warmup_steps to lr, then cosine to 0 at
  `steps` (`schedule="constant"` keeps lr after warm-up); at each of `restarts` the cosine starts
  again from the peak (a training run in phases, e.g. COIN's). The lr is a pure function of the
  step, so it needs no state of its own to resume.
- Checkpoints: every `checkpoint_every` steps (0 = only at the end) and after the last step,
  `<out>/checkpoint.pt` is written atomically with the step, model, optimizer, the task's
  extra state, the RNG states of every rank and the hash of the stage config that owns `out`
  (`unsupft.stage.owner`). When `train` starts and that file exists, it resumes from it, after
  checking it was written under the same stage config. Once `steps` are done, a further call
  returns at once.
- A loss that turns NaN or infinite stops the run with one line (`UserError`) naming the first such
  step and the likely cause, before any checkpoint is written after it: the last checkpoint stays
  a good one to resume from. The check costs no device sync per step (a flag kept on the device,
  read at log and checkpoint steps).
- Metrics: every `log_every` steps (and the last) the loss, lr, the task's metrics (averaged
  over ranks) and samples/s are appended to `<out>/metrics.jsonl` by rank 0 (lines past the resumed
  step are dropped on resume). On a terminal a tqdm bar shows them with the elapsed time, ETA and
  epoch (from a BatchSource's `samples_per_epoch` and `batch_size`); otherwise each record is also
  printed as a JSON line on stdout (the job's log).
- TensorBoard: when `tensorboardX` is importable (`pip install unsupft[tensorboard]`) and
  `cfg.tensorboard` is on, rank 0 also writes each record's scalars as event files
  (`<out>/events.out.tfevents.*`, beside metrics.jsonl, so `tensorboard --logdir runs` names each
  run by its stage's folder; on S3 they are uploaded at every checkpoint and at the end).
  metrics.jsonl stays the source of truth; a resumed run purges the events past its checkpoint
  step (TensorBoard's `purge_step`), as metrics.jsonl drops those lines.
- AMP: `amp="auto"` uses bf16 autocast on CUDA, and on CPUs whose oneDNN has native bf16
  (AVX512-BF16/AMX); `"bf16"` forces it, `"off"` disables it. On this machine's AVX2 CPU bf16
  autocast made the tiny ResNet over 10x slower, so auto leaves it off there (BENCHMARKS.md).
- Channels-last: the model and 4-d float batches use the channels-last memory format: on CUDA it
  feeds tensor cores, and on this CPU (AVX2, one thread) the tiny ResNet trained about 1.3x faster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unsupft import checkpoint, distributed, stage, store
from unsupft.errors import ReportedError, UserError
from unsupft.seeding import seed_everything
from unsupft.stage import METRICS_FILE

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "unsupft-train/1"


@dataclass
class LoopConfig:
    out: str                                   # output URI; checkpoint.pt and metrics.jsonl go here
    steps: int                                 # total optimizer steps
    lr: float                                  # peak learning rate (already scaled for the batch)
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    restarts: tuple[int, ...] = ()             # steps where the cosine starts again from the peak lr
    momentum: float = 0.9                      # SGD momentum
    weight_decay: float = 1e-4                 # never applied to BatchNorm and bias parameters
    checkpoint_every: int = 0                  # steps between checkpoints; 0 = only at the end
    log_every: int = 10
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"
    progress: bool | None = None               # progress bar; None = when stderr is a terminal
    tensorboard: bool = True                   # event files in <out> when tensorboardX is installed


@dataclass
class TrainResult:
    step: int                                  # steps completed (== config.steps)
    resumed_from: int | None                   # the checkpoint step this call started from
    metrics: dict[str, float]                  # the last logged record


class TrainTask:
    """What a stage trains; see the module docstring. Subclass and set `model`."""

    model: nn.Module
    device: torch.device = torch.device("cpu")

    def param_groups(self) -> list[dict[str, Any]] | None:
        return None

    def training_step(self, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively here (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(amp: str, device: torch.device) -> bool:
    if amp == "auto":
        return device.type == "cuda" or cpu_has_native_bf16()
    return amp == "bf16"


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    bounds = [cfg.warmup_steps, *sorted(r for r in cfg.restarts if cfg.warmup_steps < r < cfg.steps), cfg.steps]
    start, end = next((a, b) for a, b in zip(bounds, bounds[1:]) if step < b or b == cfg.steps)
    progress = min(1.0, (step - start) / max(1, end - start))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer_groups(task: TrainTask, cfg: LoopConfig) -> list[dict[str, Any]]:
    groups = task.param_groups() or [{"params": unwrap(task.model).parameters()}]
    out, seen = [], set()
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        lr = group.get("lr", cfg.lr)
        decay = group.get("weight_decay", cfg.weight_decay)
        extra = {k: v for k, v in group.items() if k not in ("params", "lr", "weight_decay")}
        for wd, ps in ((decay, [p for p in params if p.ndim > 1]), (0.0, [p for p in params if p.ndim <= 1])):
            if ps:
                out.append({**extra, "params": ps, "lr": lr, "peak_lr": lr, "weight_decay": wd})
    if not out:
        raise ValueError("the task has no trainable parameters")
    return out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 0


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _record(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl line's record; None for a blank line or the torn last line of a run that
    stopped while appending it (a full disk, a kill), which a resumed run drops."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class _MetricsLog:
    """metrics.jsonl (rank 0): appended locally line by line, rewritten whole on S3 at checkpoints."""

    def __init__(self, out: str, resume_step: int | None, enabled: bool) -> None:
        self.uri = store.join(out, METRICS_FILE)
        self.enabled = enabled
        self.local = store.local_path(self.uri)
        self.lines: list[str] = []
        if not enabled:
            return
        if resume_step is not None and store.exists(self.uri):
            records = [(ln, _record(ln)) for ln in store.read_text(self.uri).splitlines()]
            self.lines = [ln + "\n" for ln, r in records if r is not None and r.get("step", 0) <= resume_step]
        store.write_text(self.uri, "".join(self.lines))

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self.lines.append(line)
        if self.local is not None:
            with store.writing(self.uri), open(self.local, "a") as f:
                f.write(line)

    def flush(self) -> None:
        if self.enabled and self.local is None:
            store.write_text(self.uri, "".join(self.lines))


class _TensorBoard:
    """TensorBoard scalars of the metrics records (rank 0), written with tensorboardX when it is
    installed: it needs only protobuf (about 3 MB), where `torch.utils.tensorboard` needs the whole
    `tensorboard` package and its server dependencies just to write. The events are written by the
    training thread, on disk at least every `FLUSH_SECONDS` (tensorboardX's `SummaryWriter` writes
    from a thread of its own, where a full disk ends in a traceback instead of one line). Outputs on
    S3 are written to a local folder first and uploaded at `flush`, at every checkpoint (event
    files are appended to, which S3 cannot do)."""

    FLUSH_SECONDS = 30.0

    def __init__(self, out: str, resume_step: int | None, enabled: bool) -> None:
        self.records, self.staging, self.out, self.flushed = None, None, out, time.monotonic()
        if not enabled:
            return
        try:
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            from tensorboardX.record_writer import RecordWriter
        except ImportError:  # the optional extra is not installed: metrics.jsonl alone
            return
        local = store.local_path(out)
        if local is None:
            self.staging = tempfile.TemporaryDirectory(prefix="unsupft-tb-")
            local = Path(self.staging.name)
        self.folder = str(local)  # where the event files are written (named when that fails)
        # TensorBoard's file name (tensorboardX's EventsWriter: by the second); a run resumed within
        # the same second would overwrite its predecessor's file: the nanoseconds keep them apart
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{time.time_ns():020d}"
        with store.writing(self.folder):
            local.mkdir(parents=True, exist_ok=True)
            self.records = RecordWriter(str(local / name))
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            if resume_step is not None:  # SummaryWriter's purge_step: TensorBoard drops the earlier
                # files' events at and past the step, as metrics.jsonl drops its lines
                self._write(Event(step=resume_step, file_version="brain.Event:2"))
                self._write(Event(step=resume_step, session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        self.records.write(event.SerializeToString())

    def add(self, record: dict[str, Any]) -> None:
        if self.records is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        with store.writing(self.folder):
            for name, value in record.items():
                if name not in ("step", "time") and isinstance(value, (int, float)):
                    self._write(Event(wall_time=record["time"], step=record["step"], summary=scalar(name, value)))
            if time.monotonic() - self.flushed > self.FLUSH_SECONDS:
                self._write_out()

    def _write_out(self) -> None:
        self.records.flush()  # and fsync
        self.flushed = time.monotonic()

    def flush(self) -> None:
        if self.records is None:
            return
        with store.writing(self.folder):
            self._write_out()
        if self.staging is not None:
            for path in Path(self.staging.name).iterdir():
                store.upload_file(path, store.join(self.out, path.name))

    def close(self) -> None:
        if self.records is None:
            return
        try:
            self.flush()
        finally:
            records, self.records = self.records, None
            with contextlib.suppress(OSError):  # a full disk was reported by the flush above
                records.close()
            if self.staging is not None:
                self.staging.cleanup()


class _Progress:
    """On a terminal a tqdm bar on stderr (steps, elapsed, ETA, rate, epoch, the last metrics); JSON
    lines on stdout otherwise (a job's log, which people and tools read line by line)."""

    def __init__(self, total: int, enabled: bool, tty: bool | None, start: int = 0,
                 steps_per_epoch: float | None = None) -> None:
        self.enabled, self.steps_per_epoch = enabled, steps_per_epoch
        self.tty = sys.stderr.isatty() if tty is None else tty
        # `initial` makes the rate and ETA of a resumed run count only the steps it runs itself
        self.bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr, dynamic_ncols=True,
                        disable=not (enabled and self.tty))

    def show(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if not self.tty:
            print(json.dumps(record), flush=True)
            return
        shown: dict[str, str] = {}
        if self.steps_per_epoch:
            total_epochs = self.bar.total / self.steps_per_epoch
            shown["epoch"] = f"{record['step'] / self.steps_per_epoch:.2f}/{total_epochs:.2f}"
        shown.update((k, f"{v:.4g}") for k, v in record.items()
                     if k not in ("step", "time", "samples_per_s") and isinstance(v, float))
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach().float().item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def _load_checkpoint(uri: str, cfg: LoopConfig, owner: str | None) -> dict[str, Any] | None:
    if not store.exists(uri):
        return None
    state = checkpoint.load(uri)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{uri}: not a training checkpoint of this tool; remove it or choose another --out")
    if owner is not None and state.get("owner") != owner:
        raise UserError(f"{uri}: written under another stage config than this run's (or by an older unsupft); "
                        f"resuming from it would mix two configs: delete it to start clean, or use another --out")
    if state["step"] > cfg.steps:
        raise UserError(f"{uri}: checkpoint is at step {state['step']}, past the {cfg.steps} steps asked for")
    return state


def train(task: TrainTask, data: Any, cfg: LoopConfig) -> TrainResult:
    """Train `task` on `data` for `cfg.steps` steps, resuming from `<out>/checkpoint.pt` if present."""
    if cfg.steps < 1:
        raise UserError(f"the number of steps must be at least 1 (got {cfg.steps})")
    d, device = distributed.setup()
    bf16 = use_bf16(cfg.amp, device)
    ckpt_uri = store.join(cfg.out, CHECKPOINT)

    model = task.model.to(device, memory_format=torch.channels_last)
    task.model, task.device = model, device
    optimizer = torch.optim.SGD(_optimizer_groups(task, cfg), lr=cfg.lr, momentum=cfg.momentum)

    owner = stage.owner(cfg.out)
    state = _load_checkpoint(ckpt_uri, cfg, owner)
    if state is None:
        seed_everything(cfg.seed + d.rank)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        task.load_extra_state(state.get("extra", {}))
        rngs = state["rng"]
        _set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])
    resumed_from = None if state is None else state["step"]
    start, saved_at = resumed_from or 0, resumed_from
    del state

    metrics_log = _MetricsLog(cfg.out, resumed_from, d.is_main)
    board = _TensorBoard(cfg.out, resumed_from, d.is_main and cfg.tensorboard)
    epoch_size, per_rank = getattr(data, "samples_per_epoch", None), getattr(data, "batch_size", None)
    progress = _Progress(cfg.steps, d.is_main and cfg.progress is not False, cfg.progress, start,
                         epoch_size / (per_rank * d.world_size) if epoch_size and per_rank else None)
    if d.enabled:
        task.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    def save(step: int) -> None:
        rng = distributed.all_gather_objects(_rng_state())
        if d.is_main:
            checkpoint.save(ckpt_uri, {
                "format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "extra": task.extra_state(), "rng": rng,
                "world_size": d.world_size, "config": dataclasses.asdict(cfg), "owner": owner})
            metrics_log.flush()
            board.flush()

    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

    def stop_if_diverged(done: int) -> None:
        """One line naming the step and the likely cause, before a checkpoint could hold the damage."""
        bad = int(first_bad.item())
        if distributed.mean_across_ranks({"bad": float(bad >= 0)})["bad"] == 0:
            return
        where = f"at step {bad}" if bad >= 0 else f"by step {done} (on another process)"
        kept = (f"{ckpt_uri} from step {saved_at} is kept (before it)" if saved_at is not None
                else "no checkpoint had been written yet")
        raise UserError(f"the loss became NaN or infinite {where}: likely the learning rate is too high for this "
                        f"model and batch size (lower --lr, or --lr-head/--lr-backbone), or the data hold extreme "
                        f"values; {kept}")

    last: dict[str, float] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    batches: Iterator[Any] = data.batches(start, cfg.steps, d.rank, d.world_size)
    tick, samples = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor(step, cfg)
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"batch source ended before step {step}") from None
            samples += _batch_len(batch)
            batch = _to_device(batch, device)
            with autocast:
                loss, metrics = task.training_step(batch, step)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            done = step + 1
            checkpoint_now = done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            if checkpoint_now or done % cfg.log_every == 0:
                stop_if_diverged(done)
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = distributed.mean_across_ranks(_scalars({"loss": loss, **metrics}))
                now = time.perf_counter()
                last = {"step": done, "lr": optimizer.param_groups[0]["lr"], **values,
                        "samples_per_s": samples * d.world_size / max(now - tick, 1e-9), "time": time.time()}
                tick, samples = now, 0
                metrics_log.append(last)
                board.add(last)
                progress.show(last)
            if checkpoint_now:
                save(done)
                saved_at = done
    except BaseException:
        with contextlib.suppress(ReportedError):  # the error that stopped the run is the one to report
            board.close()
        raise
    else:
        board.close()
    finally:
        progress.close()
        task.model = model
    return TrainResult(step=cfg.steps, resumed_from=resumed_from, metrics=last)
