"""Checks run by ``loss_exchange_check.py`` on every rank. Compares SigLipLoss across ranks (ring exchange)
with a single-process SigLipLoss on the concatenated global batch.

Expected (see msclip/loss.py): mean of rank losses == L; rank feature grads == W * dL/dx[slice]; mean of rank
temperature grads == dL/ds; the bias grad (averaged over ranks by the loss itself) == dL/db on every rank;
DDP-averaged parameter grads == single-process grads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from toy_towers import Toy

from msclip.loss import SigLipLoss

B, E, D = 3, 8, 6  # per-rank batch, embedding width, input width of the toy towers
BIAS = -2.0  # (not -10, whose gradients are all tiny)


def feature_check(rank: int, world: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(world * B, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(world * B, E, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ri, rt, rs = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
    ref_crit = SigLipLoss(bias_init=BIAS)
    ref = ref_crit(ri, rt, rs)
    ref.backward()
    sl = slice(rank * B, (rank + 1) * B)
    li, lt, ls = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    crit = SigLipLoss(rank=rank, world_size=world, bias_init=BIAS)
    loss = crit(li, lt, ls)
    loss.backward()
    mean_loss, scale_grad = loss.detach().clone(), ls.grad.clone()
    for t in (mean_loss, scale_grad):
        dist.all_reduce(t)
        t /= world
    return {"loss": (mean_loss - ref.detach()).abs().item(),
            "img_grad": (li.grad - world * ri.grad[sl]).abs().max().item(),
            "txt_grad": (lt.grad - world * rt.grad[sl]).abs().max().item(),
            "scale_grad": (scale_grad - rs.grad).abs().item(),
            "bias_grad": (crit.logit_bias.grad - ref_crit.logit_bias.grad).abs().item()}


def ddp_check(rank: int, world: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)
    ref_model, ref_crit = Toy(D, E, 2.3), SigLipLoss(bias_init=BIAS)
    ref_crit(*ref_model(x, y)).backward()
    model = nn.parallel.DistributedDataParallel(Toy(D, E, 2.3))  # CPU: no device_ids
    crit = SigLipLoss(rank=rank, world_size=world, bias_init=BIAS)
    sl = slice(rank * B, (rank + 1) * B)
    crit(*model(x[sl], y[sl])).backward()
    pairs = [*zip(model.module.parameters(), ref_model.parameters()), (crit.logit_bias, ref_crit.logit_bias)]
    return {"ddp_param_grad": max((p.grad - q.grad).abs().max().item() for p, q in pairs)}


def results(rank: int, world: int) -> dict[str, float]:
    return {**feature_check(rank, world), **ddp_check(rank, world)}
