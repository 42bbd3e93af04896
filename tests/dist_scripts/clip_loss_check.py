"""Checks run by ``loss_exchange_check.py`` on every rank. Compares ClipLoss across ranks with a
single-process ClipLoss on the concatenated global batch.

Expected (see msclip/loss.py): mean of rank losses == L; rank feature grads == W * dL/dx[slice];
mean of rank logit_scale grads == dL/ds; DDP-averaged parameter grads == single-process grads.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from toy_towers import Toy

from msclip.loss import ClipLoss

B, E, D = 4, 8, 6  # per-rank batch, embedding width, input width of the toy towers


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(world * B, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(world * B, E, generator=g), dim=-1)
    return img, txt


def feature_check(rank: int, world: int, local_loss: bool, with_grad: bool) -> dict[str, float]:
    img, txt = global_batch(world)
    scale = torch.tensor(10.0)
    # Single-process reference on the whole batch.
    ri, rt, rs = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
    ref = ClipLoss()(ri, rt, rs)
    ref.backward()
    # This rank's share.
    sl = slice(rank * B, (rank + 1) * B)
    li, lt, ls = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_(), scale.clone().requires_grad_()
    crit = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
    loss = crit(li, lt, ls)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    scale_grad = ls.grad.clone()
    dist.all_reduce(scale_grad)
    scale_grad /= world
    out = {"loss": (mean_loss - ref.detach()).abs().item(), "scale_grad": (scale_grad - rs.grad).abs().item()}
    if with_grad:
        out["img_grad"] = (li.grad - world * ri.grad[sl]).abs().max().item()
        out["txt_grad"] = (lt.grad - world * rt.grad[sl]).abs().max().item()
    else:  # the other ranks' contributions are dropped by design, this rank's own loss's are kept
        want_i, want_t = own_loss_grads(img, txt, scale, rank, world, local_loss)
        out["img_grad"] = (_grad(li) - want_i).abs().max().item()
        out["txt_grad"] = (_grad(lt) - want_t).abs().max().item()
    return out


def _grad(x: torch.Tensor) -> torch.Tensor:
    return x.grad if x.grad is not None else torch.zeros_like(x)  # no grad at all: a large difference


def own_loss_grads(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, rank: int, world: int,
                   local_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """d(rank's loss)/d(rank's slice) with every other slice a constant: what ``gather_with_grad=False``
    promises. The rank's loss, from its definition: the full matrix's loss, or with ``local_loss`` only
    its own B rows and B columns (targets offset by rank * B)."""
    sl = slice(rank * B, (rank + 1) * B)
    mi, mt = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
    all_i = torch.cat([img[:sl.start], mi, img[sl.stop:]])
    all_t = torch.cat([txt[:sl.start], mt, txt[sl.stop:]])
    if local_loss:
        labels = torch.arange(sl.start, sl.stop)
        own = 0.5 * (F.cross_entropy(scale * mi @ all_t.T, labels) + F.cross_entropy(scale * mt @ all_i.T, labels))
    else:
        logits = scale * all_i @ all_t.T
        labels = torch.arange(world * B)
        own = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    own.backward()
    return mi.grad, mt.grad


def ddp_check(rank: int, world: int, local_loss: bool) -> dict[str, float]:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(world * B, D, generator=g), torch.randn(world * B, D, generator=g)
    ref_model = Toy(D, E, 2.0)
    ClipLoss()(*ref_model(x, y)).backward()
    model = nn.parallel.DistributedDataParallel(Toy(D, E, 2.0))  # CPU: no device_ids
    sl = slice(rank * B, (rank + 1) * B)
    ClipLoss(local_loss=local_loss, rank=rank, world_size=world)(*model(x[sl], y[sl])).backward()
    diffs = [(p.grad - q.grad).abs().max().item()
             for p, q in zip(model.module.parameters(), ref_model.parameters())]
    return {"ddp_param_grad": max(diffs)}


def results(rank: int, world: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for local_loss in (False, True):
        for with_grad in (True, False):
            out[f"local={local_loss}/grad={with_grad}"] = feature_check(rank, world, local_loss, with_grad)
        out[f"local={local_loss}/ddp"] = ddp_check(rank, world, local_loss)
    return out
