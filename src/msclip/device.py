"""The one device picker: "auto" | "cpu" | "cuda" (| "cuda:N") -> torch.device."""
from __future__ import annotations

import torch

from .errors import MsclipError


def pick_device(requested: str | None = "auto", local_rank: int = 0) -> torch.device:
    """`auto`/None: CUDA when available, else CPU. Under torchrun each process takes GPU
    `local_rank` (modulo the GPUs visible), so one node's ranks spread over its GPUs."""
    requested = requested or "auto"
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MsclipError(f"device {requested!r} was requested but CUDA is not available; use cpu or auto")
        if requested == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(requested)
    if requested != "cpu":
        raise MsclipError(f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")
