"""The one device picker: "auto" | "cpu" | "cuda" (| "cuda:N") -> torch.device."""
from __future__ import annotations

import os

import torch

from .errors import MsclipError


def pick_device(requested: str | None = "auto", local_rank: int = 0) -> torch.device:
    """`auto`/None: CUDA when available, else CPU. `cuda` takes GPU `local_rank`, so that the processes of
    one node (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID) spread over its GPUs; when a process sees a
    single GPU (one GPU bound per task, e.g. ``srun --gpus-per-task=1``) it takes that one. An explicit
    `cuda:N` is honoured as given."""
    requested = requested or "auto"
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MsclipError(f"device {requested!r} was requested but CUDA is not available; use cpu or auto")
        if requested != "cuda":
            return torch.device(requested)
        count = torch.cuda.device_count()
        if local_rank < count:
            return torch.device("cuda", local_rank)
        if count == 1:
            return torch.device("cuda", 0)
        # Sharing GPUs modulo the count would put two ranks on one GPU, which NCCL refuses later and
        # far less clearly.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise MsclipError(f"local rank {local_rank} needs GPU {local_rank} but this process sees {count} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={visible}); start at most {count} processes per node "
                          f"(torchrun --nproc_per_node {count}) or bind one GPU to each task")
    if requested != "cpu":
        raise MsclipError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
