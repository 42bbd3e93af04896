"""The training loop: contrastive-aware gradient accumulation, clipping, non-finite skip/abort, exact resume."""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from msclip.train.distributed import DistEnv, all_reduce_max
from msclip.train.logger import RunLogger
from msclip.train.precision import Precision
from msclip.train.state import capture_rng, restore_rng

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches consumed in ``epoch``
    samples_seen: int = 0  # global
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def cut_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut the batch to its longest caption: EOT has the largest id, so argmax is the last real position."""
    longest = int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :longest]


def backward_accumulated(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                         precision: Precision, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Backward the contrastive loss of all micro-batches together; returns the (detached) loss.

    With k > 1 micro-batches a no-grad pass caches every feature first; each micro-batch is then re-run with
    grad and its fresh features are spliced into the cache, so the loss sees all k x B negatives and the
    summed gradients equal those of one big batch (open_clip's scheme). DDP syncs only on the last one.
    """
    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(micro) == 1:
        images, tokens = micro[0]
        with precision.autocast():
            out = model(images, tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        backward(loss)
        return loss.detach().float()
    with torch.no_grad(), precision.autocast():
        cached = [model(i, t) for i, t in micro]
    img_cache = [c["image_features"] for c in cached]
    txt_cache = [c["text_features"] for c in cached]
    losses = []
    for j, (images, tokens) in enumerate(micro):
        last = j == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                out = model(images, tokens)
                imgs = torch.cat(img_cache[:j] + [out["image_features"]] + img_cache[j + 1:])
                txts = torch.cat(txt_cache[:j] + [out["text_features"]] + txt_cache[j + 1:])
                loss = loss_fn(imgs, txts, out["logit_scale"])
            backward(loss)
        losses.append(loss.detach().float())
    return torch.stack(losses).mean()


class TrainLoop:
    def __init__(self, *, model: nn.Module, unwrapped: nn.Module, loader_factory: Callable[[int], Any],
                 batches_per_epoch: int, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 precision: Precision, scaler: torch.amp.GradScaler | None, env: DistEnv, total_steps: int,
                 accum_freq: int, grad_clip_norm: float | None, logit_scale_max: float | None,
                 max_nonfinite: int, global_batch: int, logger: RunLogger, log_every: int, progress: bool,
                 save_every: int, save_fn: Callable[[LoopState, dict], str], eval_every: int,
                 eval_fn: Callable[[int], dict[str, float] | None] | None, state: LoopState,
                 resume_rng: dict[str, Any] | None = None, resume_epoch_rng: dict[str, Any] | None = None,
                 stop_after: int | None = None) -> None:
        self.__dict__.update({k: v for k, v in locals().items() if k != "self"})
        self.steps_per_epoch = batches_per_epoch // accum_freq
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {batches_per_epoch} batches, fewer than train.accum_freq={accum_freq}")
        self.last_checkpoint = ""
        self.history: list[float] = []  # loss per optimiser step (this process's run only)

    # --- data position -----------------------------------------------------------------------------------
    def _epoch_iter(self) -> Iterator:
        """Iterator over this epoch's remaining batches; on resume replays the epoch's RNG and skips ahead."""
        st = self.state
        loader = self.loader_factory(st.epoch)
        if st.batch_in_epoch == 0 or self.resume_epoch_rng is None:
            if self.resume_rng is not None:  # resumed exactly at an epoch boundary
                restore_rng(self.resume_rng)
            self.epoch_rng = capture_rng()
            it = iter(loader)
        else:
            restore_rng(self.resume_epoch_rng)  # the shuffle order and worker seeds come from here
            self.epoch_rng = self.resume_epoch_rng
            it = iter(loader)
            for _ in range(st.batch_in_epoch):
                next(it)
            restore_rng(self.resume_rng)
        self.resume_rng = self.resume_epoch_rng = None
        usable = self.steps_per_epoch * self.accum_freq - st.batch_in_epoch
        return itertools.islice(it, usable)

    # --- one optimiser step ----------------------------------------------------------------------------
    def _step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float | None, bool]:
        self.scheduler.step(self.state.step)
        loss = backward_accumulated(self.model, micro, self.loss_fn, self.precision, self.scaler)
        loss_val = float(loss)
        bad = all_reduce_max(0.0 if torch.isfinite(loss) else 1.0, self.env) > 0
        grad_norm = None
        if not bad and self.grad_clip_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.unwrapped.parameters(), self.grad_clip_norm)
            grad_norm = float(norm)
            # with fp16 the scaler itself skips inf-grad steps and lowers its scale; that is not an error
            bad = self.scaler is None and not torch.isfinite(norm)
        if bad:  # (with a scaler, bad implies no unscale_ happened, so there is nothing to update)
            self.optimizer.zero_grad(set_to_none=True)
            return loss_val, grad_norm, False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.logit_scale_max is not None:
            with torch.no_grad():
                self.unwrapped.logit_scale.clamp_(0.0, self.logit_scale_max)
        return loss_val, grad_norm, True

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = batch
        dev = self.env.device
        trim = getattr(self.unwrapped, "trim_tokens", cut_tokens)  # the model's rule (rounded lengths)
        return images.to(dev, non_blocking=True), trim(tokens).to(dev, non_blocking=True)

    def _maybe_eval(self, step: int, force: bool = False) -> None:
        if self.eval_fn is None or not (force or (self.eval_every > 0 and step % self.eval_every == 0)):
            return
        rng = capture_rng()  # evaluation must not shift the training RNG stream (exact resume)
        metrics = self.eval_fn(step)
        restore_rng(rng)
        self.model.train()
        if metrics:
            self.logger.log("zeroshot", step, metrics)

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> LoopState:
        st = self.state
        start_step = st.step
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not (self.progress and self.env.is_master),
                   unit="step", dynamic_ncols=True, desc="train")
        self.model.train()
        t_last, n_last = time.perf_counter(), st.step
        data_time = 0.0
        while st.step < self.total_steps:
            it = self._epoch_iter()
            while st.step < self.total_steps:
                t0 = time.perf_counter()
                micro = [self._to_device(b) for b in itertools.islice(it, self.accum_freq)]
                data_time += time.perf_counter() - t0
                if len(micro) < self.accum_freq:
                    break  # epoch exhausted
                loss, grad_norm, ok = self._step(micro)
                st.step += 1
                st.batch_in_epoch += self.accum_freq
                st.samples_seen += self.global_batch
                if st.batch_in_epoch >= self.steps_per_epoch * self.accum_freq:
                    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                if ok:
                    st.nonfinite_in_row = 0
                    self.history.append(loss)
                else:
                    st.nonfinite_total += 1
                    st.nonfinite_in_row += 1
                    log.warning("step %d: non-finite loss/gradient (%s); step skipped (%d in a row, %d total)",
                                st.step, loss if grad_norm is None else f"loss {loss}, grad norm {grad_norm}",
                                st.nonfinite_in_row, st.nonfinite_total)
                    self.logger.log("nonfinite", st.step, {"loss": loss, "nonfinite_total": st.nonfinite_total})
                    if st.nonfinite_in_row >= self.max_nonfinite:
                        bar.close()
                        where = self.last_checkpoint or "none was written yet"
                        raise NonFiniteLossError(
                            f"{st.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite="
                            f"{self.max_nonfinite}) at step {st.step}; stopping. Last good checkpoint: {where}. "
                            "Lower optim.lr, set train.grad_clip_norm or use bf16, then --resume latest.")
                bar.update(1)
                if st.step % self.log_every == 0 or st.step == self.total_steps:
                    now = time.perf_counter()
                    sps = (st.step - n_last) * self.global_batch / max(now - t_last, 1e-9)
                    values = {"loss": loss, "logit_scale": float(self.unwrapped.logit_scale.detach().exp()),
                              "samples_per_s": sps, "data_time": data_time / max(st.step - n_last, 1),
                              "epoch": st.epoch, "samples": st.samples_seen, "nonfinite_total": st.nonfinite_total}
                    values.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
                    if grad_norm is not None:
                        values["grad_norm"] = grad_norm
                    self.logger.log("train", st.step, values)
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.0f}")
                    t_last, n_last, data_time = now, st.step, 0.0
                done = st.step == self.total_steps
                if ok and (done or (self.save_every > 0 and st.step % self.save_every == 0)):
                    self.last_checkpoint = self.save_fn(st, self.epoch_rng if st.batch_in_epoch else {})
                self._maybe_eval(st.step, force=done)
                if self.stop_after is not None and st.step - start_step >= self.stop_after:
                    bar.close()
                    return st  # simulated interruption (tests)
                if st.batch_in_epoch == 0:
                    break  # next epoch: fresh iterator
        bar.close()
        return st
