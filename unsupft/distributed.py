"""Process-group setup from the environment that torchrun or the Kubeflow operator provides.

A stage never takes distributed options: `torchrun --nproc-per-node 4 -m unsupft pretrain ...`
sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, and a Kubeflow PyTorchJob sets either
the same variables (one process per pod) or torchrun's `PET_*` ones (NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT) when the pod command is not torchrun itself. Without any of them the
stage runs as a single process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from unsupft.errors import UserError


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
