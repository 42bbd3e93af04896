"""Process-group set-up for one process or torchrun (any number of processes and nodes).

NCCL on CUDA, gloo on CPU. DDP gets ``device_ids`` only on CUDA: DDP rejects them for CPU modules,
which is why open_clip's trainer fails under gloo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from msclip.device import pick_device


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun (or SLURM) variables; start the process group when there is more than one process."""
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    dev = pick_device(device, local_rank)  # under torchrun: GPU local_rank
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if "MASTER_ADDR" not in os.environ:  # SLURM without torchrun: caller must export the rendezvous
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is unset; launch with torchrun")
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over the default process group; ``device_ids`` only for a CUDA module."""
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device])
    return nn.parallel.DistributedDataParallel(model)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (e.g. the run folder or the resolved resume path)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_over_ranks(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise max over ranks in one collective, so that every rank takes the same skip / stop
    decision (a flag set on any rank is set on all)."""
    if not env.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
