"""Step-indexed LR schedule: linear warm-up from ``warmup_lr`` -> cosine to ``min_lr`` -> cooldown at ``min_lr``.

Each parameter group is scheduled from its own ``base_lr`` (the shared group has its own). The schedule is a
pure function of the step, so resuming only needs the step number.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, base_lr: float, *, total: int, warmup: int, cooldown: int, warmup_lr: float,
          min_lr: float, schedule: str = "cosine") -> float:
    if step < warmup:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup
    decay_end = max(total - cooldown, warmup)
    if step >= decay_end:
        return min_lr if cooldown > 0 or schedule == "cosine" else base_lr
    if schedule == "const":
        return base_lr
    t = (step - warmup) / max(1, decay_end - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    def __init__(self, optimizer: torch.optim.Optimizer, *, total: int, warmup: int = 0, cooldown: int = 0,
                 warmup_lr: float = 0.0, min_lr: float = 0.0, schedule: str = "cosine") -> None:
        if warmup + cooldown > total:
            raise ValueError(f"warm-up ({warmup}) + cooldown ({cooldown}) steps exceed the run ({total} steps)")
        self.optimizer = optimizer
        self.kw = dict(total=total, warmup=warmup, cooldown=cooldown, warmup_lr=warmup_lr, min_lr=min_lr,
                       schedule=schedule)
        for g in optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.step_num = 0

    def step(self, step: int) -> None:
        """Set every group's lr for optimiser step ``step`` (0-based)."""
        self.step_num = step
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, g["base_lr"], **self.kw)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_num, **self.kw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_num = int(state["step"])
