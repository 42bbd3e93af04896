"""One optimiser step's forward + backward over ``accum_freq`` micro-batches, exact for the contrastive loss."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from msclip.train.precision import CompiledStep, Precision

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images, trimmed tokens) on the device


def backward_accumulated(model: nn.Module, micro: list[MicroBatch], loss_fn: nn.Module, precision: Precision,
                         scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Backward the contrastive loss of all micro-batches together; returns the (detached) loss.

    With k > 1 micro-batches a no-grad pass caches every feature first; each micro-batch is then re-run with
    grad and its fresh features are spliced into the cache, so each loss sees all k x B negatives and the
    summed feature gradients equal those of one k x B batch (open_clip's scheme). The temperature multiplies
    every logit of every one of the k (numerically equal) losses, so it takes its gradient from one of them
    only, the last: otherwise it would get k times the big batch's. DDP syncs only on the last micro-batch.
    With ``train.compile: step`` (a `CompiledStep`) one micro-batch runs forward and loss as one compiled
    graph; k > 1 needs the features apart, so there only the forward is compiled and the loss is eager.
    Exact for models without batch statistics; BatchNorm layers see micro-batches of B.
    """
    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro) == 1:
        images, tokens = micro[0]
        with precision.autocast():
            if isinstance(model, CompiledStep):  # train.compile=step: forward and loss in one graph
                loss = model.forward_loss(images, tokens, loss_fn)
            else:
                out = model(images, tokens, trim=False)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        backward(loss)
        return loss.detach().float()
    with torch.no_grad(), precision.autocast():
        cached = [model(i, t, trim=False) for i, t in micro]
    img_cache = [c["image_features"] for c in cached]
    txt_cache = [c["text_features"] for c in cached]
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses = []
    for j, (images, tokens) in enumerate(micro):
        last = j == len(micro) - 1
        with model.no_sync() if is_ddp and not last else contextlib.nullcontext():
            with precision.autocast():
                out = model(images, tokens, trim=False)
                imgs = torch.cat(img_cache[:j] + [out["image_features"]] + img_cache[j + 1:])
                txts = torch.cat(txt_cache[:j] + [out["text_features"]] + txt_cache[j + 1:])
                scale = out["logit_scale"] if last else out["logit_scale"].detach()
                loss = loss_fn(imgs, txts, scale)
            backward(loss)
        losses.append(loss.detach().float())
    return torch.stack(losses).mean()
