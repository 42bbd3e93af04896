"""Process-group set-up for one process, torchrun (any number of processes and nodes) or plain ``srun``.

Who am I is read from the environment, as open_clip does: torchrun's RANK / LOCAL_RANK / WORLD_SIZE win
(they are also set under ``srun torchrun``, where the SLURM variables describe the launchers, not the
workers); without them SLURM's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS describe a process started by
``srun`` directly. The local rank picks the GPU; the global rank picks the data shard (data/ is given
``rank`` and ``world_size``). NCCL on CUDA, gloo on CPU. DDP gets ``device_ids`` only on CUDA: DDP rejects
them for CPU modules, which is why open_clip's trainer fails under gloo.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from msclip.device import pick_device
from msclip.errors import MsclipError

logger = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
SLURM_PORT_BASE = 20000  # MASTER_PORT under srun when unset: base + SLURM_JOB_ID % SLURM_PORT_SPAN
SLURM_PORT_SPAN = 20000


class DistributedEnvError(MsclipError):
    """The launcher's environment variables are missing, malformed or contradict each other."""


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in the job, as the launcher described it."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launcher: str = "single"  # "torchrun" | "slurm" | "single"


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    launcher: str = "single"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedEnvError(f"environment variable {name}={raw!r} is not an integer") from None


def _read_triple(env: Mapping[str, str], names: tuple[str, str, str], launcher: str) -> WorldInfo:
    """All three of (rank, local rank, world size) or none: a partial set means a broken launch script."""
    missing = [n for n in names if n not in env]
    if missing:
        present = [n for n in names if n in env]
        raise DistributedEnvError(f"{', '.join(present)} set but {', '.join(missing)} not: {launcher} sets "
                                  f"all of {', '.join(names)}; set the missing one(s) or unset the others")
    rank, local_rank, world = (_int_var(env, n) for n in names)
    r_name, l_name, w_name = names
    if world < 1:
        raise DistributedEnvError(f"{w_name}={world}: the number of processes must be >= 1")
    if not 0 <= rank < world:
        raise DistributedEnvError(f"{r_name}={rank} with {w_name}={world}: the rank must be in 0..{world - 1}")
    # A process with local rank k has k peers of lower global rank on its node.
    if not 0 <= local_rank <= rank:
        raise DistributedEnvError(f"{l_name}={local_rank} with {r_name}={rank}: the local rank must be in "
                                  f"0..{rank} (a node's processes are a subset of the lower global ranks)")
    return WorldInfo(rank=rank, local_rank=local_rank, world_size=world, launcher=launcher)


def world_info(environ: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, local rank and world size from torchrun's variables, else SLURM's, else one process."""
    env = os.environ if environ is None else environ
    if any(n in env for n in TORCHRUN_VARS):
        info = _read_triple(env, TORCHRUN_VARS, "torchrun")
        if "LOCAL_WORLD_SIZE" in env:  # torchrun also says how many processes run on this node
            local_world = _int_var(env, "LOCAL_WORLD_SIZE")
            if not info.local_rank < local_world <= info.world_size:
                raise DistributedEnvError(
                    f"LOCAL_WORLD_SIZE={local_world} with LOCAL_RANK={info.local_rank} and "
                    f"WORLD_SIZE={info.world_size}: needs LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
        return info
    if any(n in env for n in SLURM_VARS):
        return _read_triple(env, SLURM_VARS, "slurm")
    return WorldInfo()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-004,9],cpu1`` -> ``gpu003``, ``a[1-2]-b[5,7]`` -> ``a1-b5``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if depth < 0 or entry.count("[") != entry.count("]"):
        raise DistributedEnvError(f"SLURM host list {nodelist!r} has unbalanced brackets")
    # Each bracket group expands to its first range's first value (zero padding kept as written).
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), entry)
    if not host:
        raise DistributedEnvError(f"SLURM host list {nodelist!r} names no host")
    return host


def rendezvous_address(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Where rank 0 listens when srun started the processes: MASTER_ADDR, else the first host of
    SLURM_JOB_NODELIST (or SLURM_NODELIST); MASTER_PORT, else a port derived from SLURM_JOB_ID, so that
    two jobs sharing a node do not collide."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
            if env.get(name, "").strip():
                addr = first_host(env[name])
                break
    if not addr:
        raise DistributedEnvError("more than one process but MASTER_ADDR is unset and neither SLURM_JOB_NODELIST "
                                  "nor SLURM_NODELIST names a host; launch with torchrun, or export MASTER_ADDR "
                                  "(rank 0's host) and MASTER_PORT before srun")
    if env.get("MASTER_PORT", "").strip():
        port = _int_var(env, "MASTER_PORT")
        if not 0 < port < 65536:
            raise DistributedEnvError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    elif env.get("SLURM_JOB_ID", "").strip():
        port = SLURM_PORT_BASE + _int_var(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    else:
        raise DistributedEnvError(f"more than one process but MASTER_PORT is unset (and no SLURM_JOB_ID to "
                                  f"derive one from); export MASTER_PORT (host {addr})")
    return addr, port


def _init_kwargs(info: WorldInfo, dev: torch.device) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"backend": "nccl" if dev.type == "cuda" else "gloo"}
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # binds NCCL to this GPU now, not at the first collective
    if info.launcher == "slurm":  # nobody set up a store: rank 0 opens one at the rendezvous address
        addr, port = rendezvous_address()
        host = f"[{addr}]" if ":" in addr else addr  # an IPv6 literal
        kwargs.update(init_method=f"tcp://{host}:{port}", rank=info.rank, world_size=info.world_size)
    else:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise DistributedEnvError(f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} unset; launch "
                                      f"with torchrun, which sets them")
    return kwargs


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun or SLURM variables (`world_info`), take the local rank's GPU, and start the process
    group when there is more than one process."""
    info = world_info()
    dev = pick_device(device, info.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank, world = info.rank, info.world_size
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(**_init_kwargs(info, dev))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if info.launcher != "single" and (rank, world) != (info.rank, info.world_size):
            names = TORCHRUN_VARS if info.launcher == "torchrun" else SLURM_VARS
            raise DistributedEnvError(f"the process group has rank {rank} of {world} but the environment says "
                                      f"{names[0]}={info.rank}, {names[2]}={info.world_size}")
        logger.log(logging.INFO if rank == 0 else logging.DEBUG,
                   "distributed: rank %d of %d, local rank %d, %s, launched by %s, device %s",
                   rank, world, info.local_rank, dist.get_backend(), info.launcher, dev)
    return DistEnv(rank=rank, local_rank=info.local_rank, world_size=world, device=dev, launcher=info.launcher)


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
