"""Symmetric InfoNCE (CLIP) loss with an autograd-aware all-gather for data-parallel training, and the
SigLIP pairwise sigmoid loss with a ring exchange (`SigLipLoss`, at the end).

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
        if torch.compiler.is_compiling():  # in a graph arange is free, and filling the cache there would be a
            return torch.arange(offset, offset + n, device=device, dtype=torch.long)  # guard that recompiles
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


# --- SigLIP ------------------------------------------------------------------------------------------------

def _p2p_shift(x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:
    """Send ``x`` to rank ``send_to`` and return the tensor of the same shape that ``recv_from`` sent."""
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), send_to), dist.P2POp(dist.irecv, received, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    """One step around the ring: every rank passes its tensor on to ``send_to``. The backward is the same
    step the other way round, so each gradient returns to the rank whose features produced it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_to: int, recv_from: int) -> torch.Tensor:  # type: ignore[override]
        ctx.peers = (send_to, recv_from)
        return _p2p_shift(x, send_to, recv_from)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        send_to, recv_from = ctx.peers
        return _p2p_shift(grad, recv_from, send_to), None, None


class _MeanGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward averages the gradient over ranks. The loss's own bias is no part of
    the DDP module, so it is synchronised here, exactly as DDP averages the model's parameters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): each image-text pair is one binary match / no-match decision,
    ``-sum log sigmoid(z_ij (s x_i.y_j + b)) / B`` with ``z = +1`` on the diagonal, ``-1`` elsewhere.

    No softmax couples the rows, so a rank never needs the whole similarity matrix: under DDP the text
    features travel round a ring (P2P, W - 1 steps, gradients sent back the same way) and each rank scores
    its B images against one block of B texts at a time. The rank losses average to the single-process
    loss of the concatenated batch (the gradient convention of `ClipLoss` above: feature grads are
    ``W * dL/dx``, DDP's averaging cancels W). The learnable bias ``logit_bias`` (init -10, with a
    temperature of 10: the SigLIP paper's start, where every pair starts out at "no match") belongs to this
    module; the trainer saves its ``state_dict`` with the train state and optimises it without weight decay.

    Gradient accumulation (`msclip.train.accumulation.backward_accumulated`) detaches the temperature of all but
    the last micro-batch, because each of the k losses scores the whole cached batch; the bias follows
    the temperature (it is detached when ``logit_scale`` does not require grad), so it gets the big
    batch's gradient once, not k times.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, bias_init: float = -10.0) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.logit_bias = nn.Parameter(torch.tensor(float(bias_init)))

    def _bias(self, logit_scale: torch.Tensor) -> torch.Tensor:
        bias = self.logit_bias if logit_scale.requires_grad else self.logit_bias.detach()
        if self.world_size > 1 and bias.requires_grad:
            bias = _MeanGradOverRanks.apply(bias)
        return bias

    @staticmethod
    def block_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                   bias: torch.Tensor, matching: bool) -> torch.Tensor:
        """The summed pair losses of one block; ``matching``: the block's diagonal holds the true pairs."""
        logits = (logit_scale * image_features @ text_features.T).float() + bias
        if matching:
            n = logits.shape[0]
            signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
            return -F.logsigmoid(signs * logits).sum()
        return -F.logsigmoid(-logits).sum()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        bias = self._bias(logit_scale)
        total = self.block_loss(image_features, text_features, logit_scale, bias, matching=True)
        if self.world_size > 1:
            send_to, recv_from = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
            texts = text_features
            for _ in range(self.world_size - 1):  # after step k this rank holds rank (r - k)'s texts
                texts = _RingShift.apply(texts, send_to, recv_from)
                total = total + self.block_loss(image_features, texts, logit_scale, bias, matching=False)
        return total / image_features.shape[0]



def make_loss(name: str = "clip", *, rank: int = 0, world_size: int = 1, local_loss: bool = False,
              gather_with_grad: bool = True, siglip_bias_init: float = -10.0) -> nn.Module:
    """``clip`` -> `ClipLoss` (``local_loss``, ``gather_with_grad``), ``siglip`` -> `SigLipLoss`."""
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size, bias_init=siglip_bias_init)
    if name != "clip":
        raise ValueError(f"unknown loss {name!r}: use clip or siglip")
    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
