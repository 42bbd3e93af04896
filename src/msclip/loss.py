"""Symmetric InfoNCE (CLIP) loss with an autograd-aware all-gather for data-parallel training.

Gradient convention (checked by ``tests/test_loss.py`` in a real 2-process gloo run): with
``gather_with_grad=True`` the backward of the gather sums, onto each rank's own features, the gradients that
every rank's loss sends to them. Let ``L`` be the single-process loss on the concatenated global batch.

* ``local_loss=False``: every rank computes the full ``L``; feature grads on rank r = ``W * dL/dx_r``.
* ``local_loss=True``: rank r's loss covers only its rows, the per-rank losses average to ``L`` and their sum
  is ``W * L``, so again feature grads on rank r = ``W * dL/dx_r``.

DDP then averages parameter grads over the W ranks, which cancels the factor W: parameters (the
``logit_scale`` included, whose per-rank grads average to ``dL/ds``) get exactly ``dL/dtheta``.
With ``gather_with_grad=False`` the loss value is the same but the other ranks' contributions to the
local features' gradient are lost; use it only to save the backward all-reduce.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@functools.cache
def _autograd_all_gather() -> Callable:
    """The autograd all-gather of this torch's functional collectives (looked up once).

    Recent torch names it ``all_gather_single_autograd`` (and deprecates the older
    ``all_gather_tensor_autograd``, which is the fallback).
    """
    import torch.distributed._functional_collectives as fc

    fn = getattr(fc, "all_gather_single_autograd", None) or getattr(fc, "all_gather_tensor_autograd", None)
    if fn is None:  # pragma: no cover - every supported torch has one of them
        raise RuntimeError(f"torch {torch.__version__} has no autograd all-gather; msclip needs torch >= 2.11")
    return fn


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` over the default group along dim 0; gradients flow back to every rank's slice."""
    out = _autograd_all_gather()(x.contiguous(), 0, dist.group.WORLD)
    # AsyncCollectiveTensor waits lazily; make the result a plain tensor for the matmul.
    return out.wait() if hasattr(out, "wait") else out


def _gather_no_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    parts[rank] = x  # the local slice keeps its graph
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool = True,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the features of all ranks (rank order) -> ``([W*B, E], [W*B, E])``.

    Every rank must pass the same batch size. ``local_loss`` is accepted for API symmetry with
    ``ClipLoss``; the gather is the same either way (without grad the local slice is always swapped
    back in, so its graph is kept in both modes).
    """
    del local_loss
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    return (_gather_no_grad(image_features, rank, world_size),
            _gather_no_grad(text_features, rank, world_size))


class ClipLoss(nn.Module):
    """Mean of the image->text and text->image cross-entropies over the similarity matrix.

    ``forward`` takes L2-normalised features ``[B, E]`` and the exponentiated ``logit_scale`` (the model's
    forward dict gives both). With ``local_loss`` a rank scores only its own B rows against all W*B
    columns (memory linear in W), with targets offset by ``rank * B``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, n: int, device: torch.device) -> torch.Tensor:
        offset = n * self.rank if (self.local_loss and self.world_size > 1) else 0
        key = (device, n, offset)
        if key not in self._labels:  # cached: the same (device, size) repeats every step
            self._labels[key] = torch.arange(offset, offset + n, device=device, dtype=torch.long)
        return self._labels[key]

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor,
               logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            per_image = logit_scale * image_features @ text_features.T
            return per_image, per_image.T
        all_img, all_txt = gather_features(
            image_features, text_features, local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size)
        if self.local_loss:
            return logit_scale * image_features @ all_txt.T, logit_scale * text_features @ all_img.T
        per_image = logit_scale * all_img @ all_txt.T
        return per_image, per_image.T

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(per_image.shape[0], per_image.device)
        return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))
