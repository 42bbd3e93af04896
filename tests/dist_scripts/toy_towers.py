"""The two linear "towers" the loss checks train under DDP (imported by the dist scripts beside it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Toy(nn.Module):
    def __init__(self, in_dim: int, embed_dim: int, log_scale: float) -> None:
        super().__init__()
        torch.manual_seed(1)  # every rank and the single-process reference start from the same weights
        self.img = nn.Linear(in_dim, embed_dim)
        self.txt = nn.Linear(in_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(log_scale))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1), self.logit_scale.exp()
