"""The training loop: contrastive-aware gradient accumulation, clipping, non-finite skip/abort, exact resume.

``TrainLoop.run`` walks epochs; each epoch yields groups of ``accum_freq`` micro-batches; each group is one
optimiser step (``train_step``), followed by bookkeeping, logging, checkpointing and evaluation.
"""
from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from msclip.data.device_batch import images_to_model_input
from msclip.model import MSCLIP
from msclip.train.accumulation import MicroBatch, backward_accumulated
from msclip.train.distributed import DistEnv, max_over_ranks
from msclip.train.failures import DataWorkerDied, NonFiniteLossError, worker_death
from msclip.train.logger import RunLogger
from msclip.train.precision import Precision
from msclip.train.state import capture_rng, restore_rng

log = logging.getLogger(__name__)



@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches consumed in ``epoch``
    samples_seen: int = 0  # global
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    skips: dict[str, int] = field(default_factory=dict)  # data skip counts of the run, over ranks, at the save

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopSettings:
    """The recipe values the loop reads (steps are optimiser steps)."""

    total_steps: int
    steps_per_epoch: int
    global_batch: int  # samples per optimiser step over all processes
    accum_freq: int = 1
    grad_clip_norm: float | None = None
    logit_scale_max: float | None = None
    max_nonfinite: int = 5
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    progress: bool = False


@dataclass
class ResumeRng:
    """RNG states saved with the checkpoint: ``now`` at the save, ``epoch`` at the start of its epoch."""

    now: dict[str, Any] | None = None
    epoch: dict[str, Any] | None = None


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    ok: bool  # False: non-finite loss or gradient, the update was skipped


class TrainLoop:
    def __init__(self, *, model: nn.Module, unwrapped: MSCLIP, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, precision: Precision,
                 scaler: torch.amp.GradScaler | None, loader_factory: Callable[[int], Any], env: DistEnv,
                 settings: LoopSettings, logger: RunLogger, save_fn: Callable[[LoopState, dict], str],
                 eval_fn: Callable[[int], dict[str, float] | None] | None, state: LoopState,
                 resume_rng: ResumeRng | None = None, stop_after: int | None = None,
                 stats_fn: Callable[[], dict[str, int]] | None = None) -> None:
        self.model = model  # what forward runs through (DDP-wrapped under torchrun)
        self.unwrapped = unwrapped  # the MSCLIP itself: clipping, clamping, logging
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.scaler = scaler
        self.loader_factory = loader_factory  # epoch -> iterable of (images, tokens)
        self.env = env
        self.cfg = settings
        self.logger = logger
        self.save_fn = save_fn
        self.eval_fn = eval_fn
        self.state = state
        self.resume_rng = resume_rng or ResumeRng()
        self.stop_after = stop_after  # end after this many steps without a final checkpoint (tests)
        self.epoch_rng: dict[str, Any] = {}  # RNG at the start of the current epoch (saved mid-epoch)
        self.last_checkpoint = ""
        self.stop_request: Any = None  # its ``signum`` turns non-zero on SIGINT/SIGTERM (train/stop.py)
        self.stopped_by = 0  # the signal this invocation stopped on (0: it did not)
        self._fetching = False  # inside the wait for the next batch (see _after_worker_death)
        self._stop_signum = 0.0  # the stop signal as agreed by all ranks at the last step
        self._saved_step = -1
        self.history: list[float] = []  # loss per good optimiser step (this invocation only)
        self._meter_t, self._meter_step, self._data_time = time.perf_counter(), state.step, 0.0
        # skip counts: this process's data stats (``DataStats.as_dict``) since ``_skip_zero`` (taken after a
        # resume's replay of the epoch's head, counted by the earlier run), plus the resumed run's totals
        self.stats_fn = stats_fn
        self._skip_base = dict(state.skips)
        self._skip_zero: dict[str, int] | None = None
        self.start_step, self._run_t0 = state.step, time.perf_counter()

    # --- data position -----------------------------------------------------------------------------------
    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's remaining loader batches; on resume replays the epoch's RNG and skips ahead."""
        st, rng = self.state, self.resume_rng
        loader = self.loader_factory(st.epoch)
        if st.batch_in_epoch == 0 or rng.epoch is None:
            if rng.now is not None:  # resumed exactly at an epoch boundary
                restore_rng(rng.now)
            self.epoch_rng = capture_rng()
            it = iter(loader)
        else:
            restore_rng(rng.epoch)  # the shuffle order and worker seeds come from here
            self.epoch_rng = rng.epoch
            it = iter(loader)
            for _ in range(st.batch_in_epoch):
                next(it)
            restore_rng(rng.now)
        self.resume_rng = ResumeRng()
        usable = self.cfg.steps_per_epoch * self.cfg.accum_freq - st.batch_in_epoch
        return itertools.islice(it, usable)

    def _to_device(self, batch: tuple[torch.Tensor, torch.Tensor]) -> MicroBatch:
        images, tokens = batch
        dev = self.env.device
        # cut to the longest caption on the CPU, before the copy (no device sync to find the length)
        tokens = self.unwrapped.trim_tokens(tokens)
        pre = self.unwrapped.cfg.preprocess
        return images_to_model_input(images, dev, pre.mean, pre.std), tokens.to(dev, non_blocking=True)

    def _micro_batches(self, batches: Iterator[Any]) -> Iterator[list[MicroBatch]]:
        """Groups of ``accum_freq`` micro-batches, one per optimiser step."""
        while True:
            t0 = time.perf_counter()
            self._fetching = True  # a data worker's death seen here leaves the last step's state whole
            micro = [self._to_device(b) for b in itertools.islice(batches, self.cfg.accum_freq)]
            self._fetching = False
            self._data_time += time.perf_counter() - t0
            if len(micro) < self.cfg.accum_freq:
                return
            yield micro

    # --- one optimiser step ----------------------------------------------------------------------------
    def train_step(self, micro: list[MicroBatch]) -> StepResult:
        """Forward/backward, then one update unless the loss or the gradient norm is non-finite on any rank.

        The gradient norm is computed every step (one fused norm; with clipping it is the clipping's own),
        so NaN gradients behind a finite loss are caught with clipping off too. A skipped step changes no
        weight, no buffer (BatchNorm statistics are restored) and no optimiser state; its gradients are
        dropped. With fp16 the gradients are unscaled first, and an overflow alone is the scaler's
        business: it skips that update itself and lowers its scale, which is not counted as an error.
        """
        self.scheduler.step(self.state.step)
        buffers = [b.clone() for b in self.unwrapped.buffers()]
        loss = backward_accumulated(self.model, micro, self.loss_fn, self.precision, self.scaler)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # the loss may own parameters (SigLIP's bias): they are clipped and checked with the model's
        params = [p for p in itertools.chain(self.unwrapped.parameters(), self.loss_fn.parameters())
                  if p.grad is not None]
        if self.cfg.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        loss_val, grad_norm = float(loss), float(norm)
        loss_bad = not math.isfinite(loss_val)
        grad_bad = not math.isfinite(grad_norm) and self.scaler is None
        signum = self.stop_request.signum if self.stop_request is not None else 0
        # one collective for the skip and the stop decision: all ranks skip, and stop, at the same step
        loss_flag, grad_flag, self._stop_signum = max_over_ranks([loss_bad, grad_bad, signum], self.env)
        bad = bool(loss_flag or grad_flag)
        if self.scaler is not None:
            if not bad:
                self.scaler.step(self.optimizer)  # (skips the update itself on an fp16 overflow)
            self.scaler.update()
        elif not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bad:
            with torch.no_grad():
                for b, saved in zip(self.unwrapped.buffers(), buffers):
                    b.copy_(saved)
        elif self.cfg.logit_scale_max is not None:
            with torch.no_grad():
                self.unwrapped.logit_scale.clamp_(0.0, self.cfg.logit_scale_max)
        return StepResult(loss_val, grad_norm, not bad)

    # --- after a step ------------------------------------------------------------------------------------
    def _advance(self, result: StepResult) -> None:
        """Count the step and its samples, move the epoch position, handle a skipped step."""
        st, cfg = self.state, self.cfg
        st.step += 1
        st.batch_in_epoch += cfg.accum_freq
        st.samples_seen += cfg.global_batch
        if st.batch_in_epoch >= cfg.steps_per_epoch * cfg.accum_freq:
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        if result.ok:
            st.nonfinite_in_row = 0
            self.history.append(result.loss)
            return
        st.nonfinite_total += 1
        st.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss/gradient (loss %s, grad norm %s); update skipped (%d in a row, "
                    "%d total)", st.step, result.loss, result.grad_norm, st.nonfinite_in_row, st.nonfinite_total)
        self.logger.log("nonfinite", st.step, {"loss": result.loss, "nonfinite_total": st.nonfinite_total})
        if st.nonfinite_in_row >= cfg.max_nonfinite:
            where = self.last_checkpoint or "none was written yet"  # every checkpoint is verified finite
            raise NonFiniteLossError(
                f"{st.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite={cfg.max_nonfinite}) "
                f"at step {st.step}; stopping. Last good checkpoint: {where}. "
                "Lower optim.lr, set train.grad_clip_norm or use bf16, then --resume latest.")

    # --- reporting -----------------------------------------------------------------------------------------
    def _local_skips(self) -> dict[str, int]:
        if self.stats_fn is None:
            return {}
        zero = self._skip_zero or {}
        return {k: v - zero.get(k, 0) for k, v in self.stats_fn().items() if k != "seen"}

    def global_report(self, loss: float = 0.0) -> tuple[float, dict[str, int]]:
        """``loss`` averaged over ranks and the run's skip counts summed over ranks, in one collective.

        With ``local_loss`` each rank's loss is its rows' part of the global batch's loss (every rank has
        the same number of rows), so the mean over ranks is the global loss. Every rank must call this.
        """
        local = self._local_skips()
        vec = [float(loss), *map(float, local.values())]
        if self.env.distributed:
            t = torch.tensor(vec, dtype=torch.float64, device=self.env.device)
            dist.all_reduce(t)
            vec = t.tolist()
            vec[0] /= self.env.world_size
        skips = {k: self._skip_base.get(k, 0) + int(round(v)) for k, v in zip(local, vec[1:])}
        return vec[0], skips

    def _log_train(self, result: StepResult, bar: tqdm) -> None:
        st, cfg = self.state, self.cfg
        if st.step % cfg.log_every != 0 and st.step != cfg.total_steps:
            return
        loss, skips = self.global_report(result.loss)  # (on every rank: it is a collective)
        now = time.perf_counter()
        steps = max(st.step - self._meter_step, 1)
        sps = (st.step - self._meter_step) * cfg.global_batch / max(now - self._meter_t, 1e-9)
        data_time = self._data_time / steps
        values = {"loss": loss, "logit_scale": float(self.unwrapped.logit_scale.detach().exp()),
                  "samples_per_s": sps, "data_time": data_time, "epoch": st.epoch,
                  "samples": st.samples_seen, "nonfinite_total": st.nonfinite_total}
        values.update({f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups})
        if result.grad_norm is not None:
            values["grad_norm"] = result.grad_norm
        values.update(skips)
        self.logger.log("train", st.step, values)
        self._meter_t, self._meter_step, self._data_time = now, st.step, 0.0
        if not self.env.is_master:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        if not bar.disable:  # a terminal: the bar carries the numbers
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{sps:.0f}")
            return
        done = st.step - self.start_step
        eta = (cfg.total_steps - st.step) * (now - self._run_t0) / max(done, 1)
        nonzero = ", ".join(f"{k} {v}" for k, v in skips.items() if v)
        log.info("step %d/%d | loss %.4f | lr %.3g | %.0f samples/s | data %.3f s/step | ETA %s | skipped: %s",
                 st.step, cfg.total_steps, loss, lr, sps, data_time, format_duration(eta), nonzero or "none")

    def _maybe_save(self, result: StepResult) -> None:
        st, every = self.state, self.cfg.save_every
        done = st.step == self.cfg.total_steps
        # the end is always saved: a skipped last step changed no weight (and every save is checked finite)
        if done or (result.ok and every > 0 and st.step % every == 0):
            self._save()

    def _save(self) -> None:
        st = self.state
        _, st.skips = self.global_report()  # the run's skip counts travel with the checkpoint
        # mid-epoch the epoch's starting RNG is needed to replay its shuffle order on resume
        self.last_checkpoint = self.save_fn(st, self.epoch_rng if st.batch_in_epoch else {})
        self._saved_step = st.step

    def _stop_requested(self) -> bool:
        """A stop signal reached a rank before this step's decision: checkpoint here and stop."""
        if not self._stop_signum or self.state.step >= self.cfg.total_steps:
            return False
        if self._saved_step != self.state.step:
            self._save()
        self.stopped_by = int(self._stop_signum)
        return True

    def _maybe_eval(self) -> None:
        step, every = self.state.step, self.cfg.eval_every
        due = step == self.cfg.total_steps or (every > 0 and step % every == 0)
        if self.eval_fn is None or not due:
            return
        rng = capture_rng()  # evaluation must not shift the training RNG stream (exact resume)
        metrics = self.eval_fn(step)
        restore_rng(rng)
        self.model.train()
        if metrics:
            self.logger.log("zeroshot", step, metrics)
            log.info("zero-shot at step %d: top-1 %.2f %%, top-5 %.2f %% (%s images)", step,
                     metrics.get("top1_pct", float("nan")), metrics.get("top5_pct", float("nan")),
                     metrics.get("images", "?"))

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> LoopState:
        st, total = self.state, self.cfg.total_steps
        start_step = st.step
        self.model.train()
        # a bar only on a terminal: redirected, its redraws would fill the log; plain lines are logged instead
        bar_on = self.cfg.progress and self.env.is_master and _is_terminal()
        with tqdm(total=total, initial=st.step, disable=not bar_on,
                  unit="step", dynamic_ncols=True, desc="train") as bar:
            try:
                return self._run_epochs(bar, start_step)
            except RuntimeError as err:
                died = worker_death(err)
                if died is None:
                    raise
                raise self._after_worker_death(died) from err

    def _after_worker_death(self, died: str) -> DataWorkerDied:
        """Met while waiting for data, the weights and the data position are those of the last finished step:
        save it (one process), so a worker killed for memory costs no training. torch reports a death from its
        SIGCHLD handler too, which can raise in the middle of a step: then nothing is saved."""
        st = self.state
        saved = None
        if self._fetching and self.env.world_size == 1 and st.step > self.start_step:
            if self._saved_step != st.step:
                self._save()
            saved = self.last_checkpoint
        newest = saved or self.last_checkpoint
        where = (f"step {st.step} was checkpointed to {saved}" if saved else
                 f"the newest checkpoint is {newest}" if newest else "no checkpoint was written")
        return DataWorkerDied(f"a data loader worker died at step {st.step} ({died}); {where}. If the system "
                              "killed it for lack of memory, use fewer data.workers or a smaller "
                              "data.shuffle_buffer", saved)

    def _run_epochs(self, bar: tqdm, start_step: int) -> LoopState:
        st, total = self.state, self.cfg.total_steps
        while st.step < total:
            epoch = st.epoch
            batches = self._epoch_batches()
            if self._skip_zero is None:  # after a resume's replay: those samples were counted before
                self._skip_zero = self._local_skips()
            for micro in self._micro_batches(batches):
                result = self.train_step(micro)
                self._advance(result)
                bar.update(1)
                self._log_train(result, bar)
                self._maybe_save(result)
                self._maybe_eval()
                if self._stop_requested():
                    return st
                if self.stop_after is not None and st.step - start_step >= self.stop_after:
                    return st  # simulated interruption (tests)
                if st.step >= total:
                    break
            if st.step < total and st.epoch == epoch:  # the loader gave fewer batches than it promised
                log.warning("epoch %d ended after %d of %d batches; starting the next epoch", epoch,
                            st.batch_in_epoch, self.cfg.steps_per_epoch * self.cfg.accum_freq)
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        return st


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``, for ETAs and run times."""
    if not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
