"""Process-group setup from the environment that torchrun or the Kubeflow operator provides, and
the launcher that starts a stage's processes (`unsupft launch`).

A stage never takes distributed options: `unsupft launch --nproc-per-node 4 pretrain ...` (or plain
`torchrun --nproc-per-node 4 -m unsupft pretrain ...`) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
MASTER_PORT for each process, and a Kubeflow PyTorchJob sets either the same variables (one process
per pod) or torchrun's `PET_*` ones (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) when the pod
command is not a launcher. Without any of them the stage runs as a single process.

`launch` is torchrun that exits with the stage's own code. torchrun exits 1 whenever a worker
fails, whatever the worker's code: bad input (2), waiting for labels (75) and an infrastructure
failure (69) all left a multi-process stage's container as 1, so the Job's `podFailurePolicy` rule
for 2 and 75 never fired and the driver retried bad input on GPUs. `launch` runs
`torch.distributed.run`'s own parser and `run()`: the same options, the same `PET_*` environment
defaults (that parser's `env` actions read them), rendezvous, agent and restarts, every worker
`python -u -m unsupft STAGE ...` with its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
from torchrun's agent (read by `env_dist`, as before). Only its end differs: failed workers give the
code `stage_exit_code` picks, a SIGTERM or SIGINT to the launcher (torchrun forwards it to the
workers first) 128 + the signal's number, as a shell reports a process killed by it.

Whoever starts `launch` configures the rendezvous, so the rendered stage objects (`unsupft.ctl.kube`)
carry no rendezvous flags:
- Kubeflow Trainer v2.3.0's torch plugin (kubeflow/trainer
  pkg/runtime/framework/plugins/torch/torch.go, `EnforceMLPolicy`) injects PET_NNODES,
  PET_NPROC_PER_NODE and PET_NODE_RANK (the Job completion index) into the `node` container
  whatever its command, and PET_MASTER_ADDR/PET_MASTER_PORT for every command but torchtune's
  `tune run` (`constants.TorchTuneEntrypoint`, the only command it inspects or rewrites); its
  webhook (`Validate`, same file) refuses those five names in `trainer.env` and checks nothing else
  of the command, which the JobSet plugin copies into that container as it is
  (pkg/runtime/framework/plugins/jobset/builder.go, `Trainer`).
- The training operator v1.9.0 (kubeflow/training-operator pkg/controller.v1/pytorch/envvar.go
  `setPodEnv`, master.go) sets PET_NNODES (all replicas), PET_NPROC_PER_NODE (`nprocPerNode`),
  PET_NODE_RANK, PET_MASTER_ADDR/PET_MASTER_PORT and also MASTER_ADDR, MASTER_PORT, WORLD_SIZE and
  RANK in the pod; torchrun's agent sets the workers' own values over those. Its webhook
  (pkg/webhooks/pytorch/pytorchjob_webhook.go) checks the container's name, not its command.
- By hand: `unsupft launch --standalone --nproc-per-node 4 pretrain ...`.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unsupft.errors import EXIT_INFRA, EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS, UserError

# The codes a stage chooses itself, strongest first. Bad input wins: every rank reads the same input
# and config, so a retry meets it again, and the peers of a rank that stopped on it fail only as a
# consequence (exit 1 from a broken collective, or torchrun's SIGTERM). Waiting for labels is next:
# a deliberate, complete stop (its state is saved), which a retry cannot end either. An
# infrastructure failure (69, after the stage's own retries) outranks the 1 its peers then crash
# with, so the scheduler sees the cause; both may be retried, so naming it costs nothing.
STAGE_CODES = (EXIT_USER_ERROR, EXIT_WAITING_FOR_LABELS, EXIT_INFRA)
SIGNAL_BASE = 128  # a process killed by signal N exits 128 + N in a shell, and so in a container


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist() -> Dist:
    """Rank, world size and local rank as the launcher set them (single process when unset)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return Dist(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    nnodes = env.get("PET_NNODES", "")
    if nnodes.isdigit() and env.get("PET_NPROC_PER_NODE", "1") == "1":
        # PyTorchJob pods started without torchrun: one process per pod, rank = node rank.
        os.environ.setdefault("MASTER_ADDR", env.get("PET_MASTER_ADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", env.get("PET_MASTER_PORT", "29500"))
        return Dist(int(env.get("PET_NODE_RANK", "0")), int(nnodes), 0)
    return Dist()


def per_rank_batch(batch_size: int) -> int:
    """Each process's share of a global `--batch-size`."""
    world = env_dist().world_size
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the {world} processes")
    return batch_size // world


def setup() -> tuple[Dist, torch.device]:
    """Join the process group (NCCL on CUDA, Gloo on CPU) once; return ranks and this process's device."""
    d = env_dist()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus <= d.local_rank:
        raise UserError(f"local rank {d.local_rank} has no GPU: {gpus} visible on this node; start one process "
                        "per GPU, or set CUDA_VISIBLE_DEVICES= to train on the CPU")
    device = torch.device(f"cuda:{d.local_rank}") if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if gpus else "gloo", rank=d.rank, world_size=d.world_size,
                                device_id=device if gpus else None)
        # A group still alive at interpreter exit can abort the process ("terminate called without
        # an active exception", Gloo's threads) after the stage has finished: tear it down first.
        atexit.register(_destroy_process_group)
    return d, device


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (no gradient); itself on one process."""
    if world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (collective: every rank must call it)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (collective)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def default_device() -> torch.device:
    """The device a single-process stage computes on: the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_exit_code(exit_codes: Sequence[int]) -> int:
    """The container's exit code for workers that failed with `exit_codes` (as `Popen` reports them:
    negative for a signal), in rank order.

    A code of `STAGE_CODES` wins, in that order; else the first other code a worker exited with
    itself (1: an unhandled exception, a bug); else 128 + the lowest rank's signal. Signals come last
    because the agent, once a worker has failed, sends SIGTERM to the others and records them as
    failed too (torch/distributed/elastic/multiprocessing/api.py, `SubprocessContext._poll`), all at
    once: the failures carry no order in time (their timestamps are the second they were recorded),
    so when only signals are left, a worker the OOM killer ended (SIGKILL, 137) and a peer the agent
    stopped (SIGTERM, 143) are told apart by the per-rank line `launch` prints, not by the code.
    """
    for code in STAGE_CODES:
        if code in exit_codes:
            return code
    own = [code for code in exit_codes if code > 0]
    if own:
        return own[0]
    signals = [code for code in exit_codes if code < 0]
    return SIGNAL_BASE - signals[0] if signals else 1


def _describe(exit_code: int) -> str:
    if exit_code >= 0:
        return f"exit {exit_code}"
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def launch(argv: Sequence[str]) -> None:
    """`unsupft launch [torchrun options] STAGE [stage options]`: run STAGE on every process as
    torchrun would (its options, PET_* defaults), then exit with the stage's code (module docstring)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = torchrun.get_args_parser()  # reads the PET_* environment now, as torchrun does
    parser.prog = "unsupft launch"
    parser.description = ("Run an unsupft stage on several processes: torchrun's options, then the stage "
                          "and its options; exits with the stage's own code.")
    args = parser.parse_args(argv)
    if args.module or args.no_python or args.run_path:
        raise UserError("unsupft launch runs an unsupft stage: give the stage and its options (no -m, --no-python or --run-path)")
    stage = args.training_script
    args.module, args.training_script = True, "unsupft"
    args.training_script_args = [stage, *args.training_script_args]
    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        code = stage_exit_code([failure.exitcode for failure in failed.failures.values()])
        ranks = ", ".join(f"rank {rank}: {_describe(failure.exitcode)}" for rank, failure in sorted(failed.failures.items()))
        print(f"unsupft {stage}: exit {code} ({ranks})", file=sys.stderr)
        sys.exit(code)
    except SignalException as stopped:
        sys.exit(SIGNAL_BASE + int(stopped.sigval))
