"""Training orchestration: ``train(recipe)``, run by ``msclip train`` (also ``torchrun -m msclip train``).

Order: process group -> run folder + resolved recipe -> model -> data -> optimiser/schedule/precision ->
resume -> DDP -> loop -> final checkpoint + exported weights.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import msclip
from msclip.loss import make_loss
from msclip.model import MSCLIP
from msclip.train import distributed as D
from msclip.train.logger import RunLogger
from msclip.train.failures import DataWorkerDied, NonFiniteLossError
from msclip.train.loop import LoopSettings, LoopState, ResumeRng, TrainLoop, format_duration
from msclip.train.optim import build_optimizer
from msclip.train.precision import compile_for_training, configure_backends, get_precision, set_channels_last
from msclip.train.recipe import Recipe, RecipeError
from msclip.train.run_folder import EXPORT_NAME, prepare_run_dir
from msclip.train.scheduler import WarmupCosine
from msclip.train.stop import StopRequest
from msclip.train.state import (capture_rng, check_same_model, checkpoint_path, load_part, load_resume_state,
                                load_train_state, nonfinite_tensors,
                                save_train_state)
from msclip.transforms import image_transform

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    state: LoopState
    total_steps: int
    losses: list[float] = field(default_factory=list)  # per optimiser step of this invocation
    last_checkpoint: str = ""
    exported: str = ""
    precision: str = "fp32"
    wall_s: float = 0.0
    stopped_by: int = 0  # the signal (SIGINT/SIGTERM) that stopped the run at a checkpoint; 0 = none
    start_step: int = 0  # the step this invocation started from (the resumed checkpoint's; 0 when fresh)
    skips: dict[str, int] = field(default_factory=dict)  # the run's data skip counts (over ranks and resumes)

    @property
    def steps_run(self) -> int:
        """Optimiser steps done by this invocation."""
        return self.state.step - self.start_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(recipe: Recipe, env: D.DistEnv) -> Path:
    if recipe.name:
        return Path(recipe.output_dir) / recipe.name
    if recipe.resume and recipe.resume != "latest":  # continue writing into the resumed run's folder
        ckpt = Path(recipe.resume)
        run = ckpt.parent.parent if ckpt.is_file() else (ckpt.parent if ckpt.name == "checkpoints" else ckpt)
        return run
    if recipe.resume == "latest":
        raise RecipeError("resume=latest needs a fixed run name (set name=...) to know which run to continue")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{Path(recipe.model).stem}"
    return Path(recipe.output_dir) / D.broadcast_object(name, env)


def _data(recipe: Recipe, train_tf: Any, tokenizer: Any, env: D.DistEnv) -> Any:
    from msclip.data import build_train_data

    # the recipe's data section is the pipeline's DataSpec; batch_size and workers come from it
    return build_train_data(recipe.data, image_transform=train_tf, tokenizer=tokenizer, rank=env.rank,
                            world_size=env.world_size, seed=recipe.seed, epoch=0)


def _zeroshot(recipe: Recipe, model: MSCLIP, tokenizer: Any, env: D.DistEnv,
              autocast: Any) -> Callable[[nn.Module], dict] | None:
    """eval/'s in-training zero-shot (the classifier and metrics of ``msclip zeroshot``); None when off."""
    if recipe.zeroshot.kind is None:
        return None  # and the eval transform (torchvision, slow to import) is never built
    from msclip.eval.in_training import build_zeroshot_evaluator

    eval_tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)
    return build_zeroshot_evaluator(recipe, eval_tf, tokenizer, env.device, autocast)


def train(recipe: Recipe, *, stop_after: int | None = None, overwrite: bool = False) -> TrainResult:
    """Run (or continue) the training described by ``recipe``. ``stop_after`` ends this invocation after that
    many optimiser steps without a final checkpoint, as an interruption would (used by the resume test).
    A run folder that already holds checkpoints or weights is refused unless resuming or ``overwrite``."""
    t_start = time.perf_counter()
    recipe.validate()
    if recipe.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    threads = torch.get_num_threads()
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    env = D.init_distributed(recipe.device)
    try:
        # StopRequest before the data workers start, so that they inherit it; `held`: the run folder's lock
        with StopRequest() as stop, contextlib.ExitStack() as held:
            result = _train(recipe, env, stop_after, overwrite, stop, t_start, held)
    except NonFiniteLossError:
        D.cleanup(env)  # every rank took this decision together (all-reduced), so they tear down in step
        raise
    finally:
        torch.set_num_threads(threads)  # train() may run inside a larger process (tests, the demo)
    # Not after other errors: the peers may be inside a collective and the teardown would hang;
    # torchrun stops the other ranks when one fails.
    D.cleanup(env)
    return result


def _train(recipe: Recipe, env: D.DistEnv, stop_after: int | None, overwrite: bool, stop: StopRequest,
           t_start: float, held: contextlib.ExitStack) -> TrainResult:
    run_dir = prepare_run_dir(_run_dir(recipe, env), recipe, env, overwrite, held)
    model, train_tf, tokenizer = _build_model(recipe, env)
    data = _data(recipe, train_tf, tokenizer, env)
    plan = plan_steps(recipe, data.num_batches, env.world_size)
    t = recipe.train
    loss_fn = make_loss(t.loss, rank=env.rank, world_size=env.world_size, local_loss=t.local_loss,
                        gather_with_grad=t.gather_with_grad, siglip_bias_init=t.siglip_bias_init).to(env.device)
    optimizer = build_optimizer(model, recipe.optim, plan.global_batch, list(loss_fn.parameters()))
    scheduler = WarmupCosine(optimizer, total=plan.total, warmup=plan.warmup, cooldown=plan.cooldown,
                             warmup_lr=recipe.optim.warmup_lr, min_lr=recipe.optim.min_lr,
                             schedule=recipe.optim.schedule)
    precision = get_precision(recipe.train.precision, env.device)
    scaler = precision.make_scaler()
    state, rng = LoopState(), ResumeRng()
    resume = _find_resume(recipe, run_dir, env)
    if resume:
        state, rng = _load_resume(*resume, env, model, optimizer, scheduler, scaler, loss_fn)

    zs = _zeroshot(recipe, model, tokenizer, env, precision.autocast) if env.is_master else None
    if env.is_master:
        log.info("run %s: %s, %d steps (%d per epoch), global batch %d, precision %s, %d process(es); params %s",
                 run_dir, recipe.model, plan.total, plan.steps_per_epoch, plan.global_batch, precision.name,
                 env.world_size, model.parameter_counts())
    logger = RunLogger(run_dir, enabled=env.is_master, tensorboard=recipe.log.tensorboard, start_step=state.step)
    held.callback(logger.close)  # closed on any error from here on, before the loop's own try too
    saver = CheckpointWriter(run_dir, model, optimizer, scheduler, scaler, env, plan.total,
                             recipe.checkpoint.keep_last, loss_fn)
    saver.last_finite = resume[0] if resume else ""

    def loader_for_epoch(epoch: int) -> Any:
        data.set_epoch(epoch)
        return data.loader

    def evaluate(step: int) -> dict[str, float] | None:
        metrics = zs(model) if zs is not None else None  # rank 0 only; the others wait at the barrier
        D.barrier(env)
        return metrics

    # what the loop's forward runs through: compiled (train.compile) and/or DDP-wrapped, never what is saved
    forward = compile_for_training(model, recipe.train.compile, recipe.train.compile_backend, env.distributed)
    loop = TrainLoop(
        model=D.wrap_ddp(forward, env.device) if env.distributed else forward, unwrapped=model, loss_fn=loss_fn,
        optimizer=optimizer, scheduler=scheduler, precision=precision, scaler=scaler,
        loader_factory=loader_for_epoch, env=env, settings=_loop_settings(recipe, plan), logger=logger,
        save_fn=saver, eval_fn=evaluate if recipe.zeroshot.kind else None, state=state, resume_rng=rng,
        stop_after=stop_after, stats_fn=data.stats.as_dict)
    loop.last_checkpoint = saver.last_finite
    loop.stop_request = stop
    try:
        try:
            state = loop.run()
        except DataWorkerDied as err:
            err.run_dir = run_dir  # for the resume command line
            raise
        _, skips = loop.global_report()  # (every rank: a collective)
        if env.is_master:
            _log_summary(logger, loop, plan.total, skips, time.perf_counter() - t_start)
    finally:
        logger.close()
    exported = ""
    if state.step >= plan.total and recipe.checkpoint.export and env.is_master:
        exported = str(run_dir / EXPORT_NAME)
        msclip.save_pretrained(model, exported)
    D.barrier(env)
    return TrainResult(run_dir=run_dir, state=state, total_steps=plan.total, losses=loop.history,
                       last_checkpoint=loop.last_checkpoint, exported=exported, precision=precision.name,
                       wall_s=time.perf_counter() - t_start, stopped_by=loop.stopped_by,
                       start_step=loop.start_step, skips=skips)


def _log_summary(logger: RunLogger, loop: TrainLoop, total: int, skips: dict[str, int], wall_s: float) -> None:
    """The closing line and ``summary`` record: the steps this invocation ran and the run's totals."""
    st, first = loop.state, loop.start_step
    ran = st.step - first
    steps = f"steps {first + 1}..{st.step} of {total}" if ran else f"no step (at step {st.step} of {total})"
    resumed = f", resumed at step {first}" if first else ""
    nonzero = ", ".join(f"{k} {v}" for k, v in skips.items() if v)
    log.info("%s: %s (%d in this run%s, %d done in total) in %s; samples %d; skipped: %s",
             "finished" if st.step >= total else "stopped", steps, ran, resumed, st.step, format_duration(wall_s),
             st.samples_seen, nonzero or "none")
    logger.log("summary", st.step, {"start_step": first, "steps_this_run": ran, "steps_total": st.step,
                                    "total_steps": total, "samples": st.samples_seen, "wall_s": wall_s,
                                    "nonfinite_total": st.nonfinite_total, **skips})


# --- set-up ---------------------------------------------------------------------------------------------

def _build_model(recipe: Recipe, env: D.DistEnv) -> tuple[MSCLIP, Any, Any]:
    flags = configure_backends(env.device, tf32=recipe.train.tf32, deterministic=recipe.train.deterministic)
    if flags and env.is_master:
        log.info("CUDA backend flags: %s", flags)
    seed_everything(recipe.seed)  # identical init on every rank
    model = msclip.create_model(recipe.model, pretrained=recipe.pretrained, device=env.device)
    train_tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=True)
    tokenizer = msclip.get_tokenizer(recipe.model)
    if recipe.logit_scale_init is not None or recipe.train.loss == "siglip":  # SigLIP starts at t = 10
        init = recipe.logit_scale_init if recipe.logit_scale_init is not None else math.log(10)
        model.logit_scale.data.fill_(init)
    if recipe.train.channels_last:
        log.debug("channels_last: %s", set_channels_last(model))
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    seed_everything(recipe.seed + env.rank)  # per-rank augmentation / dropout streams
    return model, train_tf, tokenizer


@dataclass
class StepPlan:
    """A run's length in optimiser steps (``optim.unit=epochs`` and ``train.epochs`` converted)."""

    steps_per_epoch: int
    total: int
    warmup: int
    cooldown: int
    global_batch: int


def plan_steps(recipe: Recipe, batches_per_epoch: int, world_size: int) -> StepPlan:
    """Convert epochs to steps: one step takes ``accum_freq`` of this process's ``batches_per_epoch``."""
    accum = recipe.train.accum_freq
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch < 1:
        raise RecipeError(f"an epoch has {batches_per_epoch} batches per process, fewer than "
                          f"train.accum_freq={accum}; lower data.batch_size or add data")
    total = recipe.train.steps or math.ceil(recipe.train.epochs * steps_per_epoch)
    o = recipe.optim
    unit = steps_per_epoch if o.unit == "epochs" else 1
    warmup, cooldown = round(o.warmup * unit), round(o.cooldown * unit)
    if warmup + cooldown > total:  # in epochs this needs the data's size, so recipe.problems cannot tell
        raise RecipeError(f"recipe: optim.warmup={o.warmup!r} + optim.cooldown={o.cooldown!r} ({o.unit}) make "
                          f"{warmup + cooldown} steps, more than the run's {total} ({steps_per_epoch} per epoch)")
    return StepPlan(steps_per_epoch=steps_per_epoch, total=total, warmup=warmup, cooldown=cooldown,
                    global_batch=recipe.data.batch_size * accum * world_size)


def _loop_settings(recipe: Recipe, plan: StepPlan) -> LoopSettings:
    return LoopSettings(
        total_steps=plan.total, steps_per_epoch=plan.steps_per_epoch, global_batch=plan.global_batch,
        accum_freq=recipe.train.accum_freq, grad_clip_norm=recipe.train.grad_clip_norm,
        logit_scale_max=recipe.logit_scale_max, max_nonfinite=recipe.train.max_nonfinite,
        log_every=recipe.log.every, save_every=recipe.checkpoint.every, eval_every=recipe.zeroshot.every,
        progress=recipe.log.progress)


# --- checkpoints and resume -------------------------------------------------------------------------------

class CheckpointWriter:
    """``writer(state, epoch_rng) -> path``: gathers every rank's RNG, rank 0 writes the train state."""

    def __init__(self, run_dir: Path, model: MSCLIP, optimizer: torch.optim.Optimizer, scheduler: WarmupCosine,
                 scaler: torch.amp.GradScaler | None, env: D.DistEnv, total_steps: int, keep_last: int,
                 loss_fn: nn.Module | None = None) -> None:
        self.run_dir = run_dir
        self.loss_fn = loss_fn  # its parameters (SigLIP's bias) are saved as "loss"
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.env = env
        self.total_steps = total_steps
        self.keep_last = keep_last
        self.last_finite = ""  # the newest checkpoint written (or resumed from); its weights were finite

    def __call__(self, st: LoopState, epoch_rng: dict) -> str:
        # never save non-finite weights (every rank holds the same weights, so all take the same decision)
        loss_state = self.loss_fn.state_dict() if self.loss_fn is not None else {}
        bad = nonfinite_tensors({**self.model.state_dict(), **{f"loss.{k}": v for k, v in loss_state.items()}})
        if bad:
            raise NonFiniteLossError(
                f"step {st.step}: {len(bad)} weight tensor(s) are non-finite (e.g. {bad[0]}); not saving them. "
                f"Newest finite checkpoint: {self.last_finite or 'none was written yet'}. "
                "Lower optim.lr, set train.grad_clip_norm or use bf16, then --resume latest.")
        rngs = _gather_objects({"rng": capture_rng(), "epoch_rng": epoch_rng}, self.env)
        path = checkpoint_path(self.run_dir, st.step)
        if self.env.is_master:
            save_train_state(path, {
                "step": st.step, "loop": st.to_dict(), "model": self.model.state_dict(),
                "model_config": self.model.cfg.to_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else {},
                "rng": rngs, "world_size": self.env.world_size, "total_steps": self.total_steps,
                "loss": loss_state,
            }, keep_last=self.keep_last)
        self.last_finite = str(path)
        return str(path)


def _find_resume(recipe: Recipe, run_dir: Path, env: D.DistEnv) -> tuple[str, dict | None] | None:
    """(path, state) of the checkpoint to resume from; rank 0 picks it (verified, with fallback), the
    others load the path it names. None when there is nothing to resume."""
    if not recipe.resume:
        return None
    found = load_resume_state(recipe.resume, run_dir) if env.is_master else None
    ckpt = D.broadcast_object(str(found[0]) if found else "", env)
    if not ckpt:
        if env.is_master:
            log.warning("resume=latest: %s has no checkpoint yet (is name=%s right?); starting from scratch",
                        run_dir, run_dir.name)
        return None
    return ckpt, found[1] if found else None


def _load_resume(ckpt: str, saved: dict | None, env: D.DistEnv, model: MSCLIP, optimizer: torch.optim.Optimizer,
                 scheduler: WarmupCosine, scaler: torch.amp.GradScaler | None,
                 loss_fn: nn.Module | None = None) -> tuple[LoopState, ResumeRng]:
    """Load a train state into the fresh objects; the recipe's lr wins over the checkpoint's.

    A checkpoint from another number of processes resumes too: the step and sample counts continue, the
    RNG streams restart and a partly done epoch is left for the next one (its data split no longer exists).
    """
    saved = saved if saved is not None else load_train_state(ckpt)
    check_same_model(ckpt, saved.get("model_config"), model.cfg.to_dict())
    load_part(ckpt, "model", lambda: model.load_state_dict(saved["model"]))
    if loss_fn is not None and (saved.get("loss") or list(loss_fn.state_dict())):
        # strict: a SigLIP run's bias must be there
        load_part(ckpt, "loss", lambda: loss_fn.load_state_dict(saved.get("loss", {})))
    fresh_lrs = {g["name"]: g["base_lr"] for g in optimizer.param_groups}
    load_part(ckpt, "optimizer", lambda: optimizer.load_state_dict(saved["optimizer"]))
    for g in optimizer.param_groups:  # (the same lr on an exact resume)
        g["base_lr"] = fresh_lrs.get(g["name"], g["base_lr"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    state = LoopState(**saved["loop"])
    rngs = saved["rng"]
    rng = ResumeRng()
    if len(rngs) == env.world_size:
        rng = ResumeRng(now=rngs[env.rank]["rng"], epoch=rngs[env.rank]["epoch_rng"] or None)
    else:
        log.warning("checkpoint was written by %d processes, this run has %d: RNG streams restart",
                    len(rngs), env.world_size)
        if state.batch_in_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
             state.batch_in_epoch)
    return state, rng


def _gather_objects(obj: Any, env: D.DistEnv) -> list[Any]:
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out
