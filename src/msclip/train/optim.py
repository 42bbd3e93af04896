"""AdamW with parameter groups: {decay, no-decay} x {modality-shared, not shared}.

No weight decay for biases, norm layers, embeddings, class/positional embeddings and logit_scale (the
model's ``no_weight_decay_names()``, plus every tensor with fewer than two dimensions, e.g. BatchNorm).
Shared parameters get their own lr / weight decay (the official LR_SHARE / WD_SHARE). Fused AdamW where all
parameters are on CUDA or all on the CPU (``adamw_kernel``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msclip.model import MSCLIP
from msclip.train.recipe import OptimRecipe

GROUP_NAMES = ("decay", "no_decay", "shared_decay", "shared_no_decay")


def scaled_lr(lr: float, cfg: OptimRecipe, global_batch: int) -> float:
    """Linear LR scaling with the global batch (official: lr per GPU x world size at 256/GPU)."""
    return lr * global_batch / cfg.base_batch_size if cfg.scale_lr else lr


def param_groups(model: MSCLIP, cfg: OptimRecipe, global_batch: int = 0) -> list[dict[str, Any]]:
    """Group ``model``'s trainable parameters; each group carries ``name`` and ``base_lr``."""
    modality = model.param_modality()
    no_wd = model.no_weight_decay_names()
    lr = scaled_lr(cfg.lr, cfg, global_batch)
    lr_sh = scaled_lr(cfg.lr if cfg.lr_shared is None else cfg.lr_shared, cfg, global_batch)
    wd_sh = cfg.weight_decay if cfg.weight_decay_shared is None else cfg.weight_decay_shared
    settings = {
        "decay": (lr, cfg.weight_decay),
        "no_decay": (lr, 0.0),
        "shared_decay": (lr_sh, wd_sh),
        "shared_no_decay": (lr_sh, 0.0),
    }
    buckets: dict[str, list[nn.Parameter]] = {k: [] for k in GROUP_NAMES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shared = modality[name] == "shared"
        decay = name not in no_wd and p.ndim >= 2
        key = ("shared_" if shared else "") + ("decay" if decay else "no_decay")
        buckets[key].append(p)
    groups = []
    for key in GROUP_NAMES:
        if buckets[key]:
            group_lr, wd = settings[key]
            groups.append({"params": buckets[key], "name": key, "lr": group_lr, "base_lr": group_lr,
                           "weight_decay": wd})
    return groups


def group_param_names(model: nn.Module, groups: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Group name -> parameter names (for tests and the run log)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [by_id[id(p)] for p in g["params"]] for g in groups}


def adamw_kernel(params: list[nn.Parameter]) -> dict[str, Any]:
    """AdamW's implementation: ``fused`` (one pass over every tensor) when all parameters are floating point
    on CUDA, or all on the CPU; otherwise torch's default. On the CPU torch's default is a per-tensor loop:
    measured on msclip-s-b32-tiny (229 tensors, 1 thread), 57.6 ms per step vs 41.2 ms foreach, 11.0 ms fused."""
    floating = all(p.is_floating_point() for p in params)
    if params and floating and (all(p.is_cuda for p in params) or all(p.device.type == "cpu" for p in params)):
        return {"fused": True}
    return {"foreach": None}


def build_optimizer(model: MSCLIP, cfg: OptimRecipe, global_batch: int,
                    extra: list[nn.Parameter] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; ``extra`` (the loss's own parameters, e.g. SigLIP's bias) join the
    no-decay group (a new group of their own when the model has no no-decay group)."""
    groups = param_groups(model, cfg, global_batch)
    if extra:
        no_decay = next((g for g in groups if g["name"] == "no_decay"), None)
        if no_decay is None:
            lr = scaled_lr(cfg.lr, cfg, global_batch)
            no_decay = {"params": [], "name": "no_decay", "lr": lr, "base_lr": lr, "weight_decay": 0.0}
            groups.append(no_decay)
        no_decay["params"] = no_decay["params"] + list(extra)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(cfg.betas), eps=cfg.eps,
                             **adamw_kernel(params))
