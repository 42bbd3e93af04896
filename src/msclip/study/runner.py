"""Running a study: every model x seed is an ordinary training run in its own folder, then evaluated once.

State of a run, read from its folder: ``evaluated`` (study-eval.json is there), ``trained`` (the exported
model.safetensors is there), ``partial`` (checkpoints only: resumed by ``resume=latest``) or ``new``.
A second call skips evaluated runs, evaluates trained ones and resumes partial ones. Runs go one after
another in this process by default; ``jobs > 1`` runs that many at once as subprocesses of
``python -m msclip train`` / ``python -m msclip study --evaluate`` (each with its share of the CPU threads,
or its own GPU), the same commands `print_commands` gives to any other scheduler.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from msclip import io as mio
from msclip.device import pick_device
from msclip.errors import MsclipError
from msclip.train import train
from msclip.train.state import checkpoint_dir, list_checkpoints
from msclip.train.stop import PARENT_ENV

from . import metrics as M
from .report import build_report
from .spec import RunPlan, StudySpec, base_recipe, plan_runs, save_study, shared_recipe_yaml

log = logging.getLogger(__name__)
STUDY_FILE, RECIPE_FILE = "study.yaml", "recipe.yaml"


class RunFailed(MsclipError):
    """A run's training or evaluation subprocess failed; the message names the run and its log."""


def run_status(plan: RunPlan) -> str:
    if (plan.run_dir / M.EVAL_FILE).is_file():
        return "evaluated"
    if (plan.run_dir / "model.safetensors").is_file():
        return "trained"
    if list_checkpoints(checkpoint_dir(plan.run_dir)):
        return "partial"
    return "new"


def prepare(spec: StudySpec) -> list[RunPlan]:
    """The study folder with the resolved study and the shared recipe (what the printed commands read)."""
    out = spec.out_dir
    save_study(spec, out / STUDY_FILE)
    mio.write_text(out / RECIPE_FILE, shared_recipe_yaml(base_recipe(spec)))
    return plan_runs(spec)


def train_command(spec: StudySpec, plan: RunPlan, extra: list[str] | None = None) -> list[str]:
    return ["msclip", "train", "--config", str(spec.out_dir / RECIPE_FILE), f"model={plan.model}",
            f"seed={plan.seed}", f"name={plan.name}", f"output_dir={plan.run_dir.parent}", "resume=latest",
            *(extra or [])]


def eval_command(spec: StudySpec, plan: RunPlan) -> list[str]:
    return ["msclip", "study", "--config", str(spec.out_dir / STUDY_FILE), "--evaluate", plan.name]


def print_commands(spec: StudySpec) -> list[str]:
    """One shell line per run (train, then evaluate); `--collect` builds the report afterwards."""
    plans = prepare(spec)
    return [f"{shlex.join(train_command(spec, p))} && {shlex.join(eval_command(spec, p))}" for p in plans]


def evaluate(spec: StudySpec, plan: RunPlan, data: M.LabelledSet | None = None) -> dict[str, Any]:
    """Evaluate one trained run and write study-eval.json into its folder."""
    if not (plan.run_dir / "model.safetensors").is_file():
        raise MsclipError(f"run {plan.name}: {plan.run_dir / 'model.safetensors'} is missing (not finished)")
    device = pick_device(plan.recipe.device)
    result = M.evaluate_run(plan.run_dir, plan.model, spec.eval, device, plan.recipe.data.fashion_mnist_root, data)
    result.update(seed=plan.seed, name=plan.name)
    mio.write_json(plan.run_dir / M.EVAL_FILE, result)
    return result


def evaluate_named(spec: StudySpec, name: str) -> dict[str, Any]:
    plans = {p.name: p for p in plan_runs(spec)}
    if name not in plans:
        raise MsclipError(f"--evaluate {name!r}: not a run of this study (runs: {', '.join(plans)})")
    return evaluate(spec, plans[name])


@dataclass
class Progress:
    """One line per finished run and an overall bar with an ETA from this invocation's pace."""

    total: int
    done: int = 0
    started: float = 0.0
    finished_here: int = 0
    write: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def run_done(self, plan: RunPlan, result: dict[str, Any] | None, seconds: float, note: str = "") -> None:
        with self.lock:
            self.done += 1
            self.finished_here += 1 if not note.startswith("already") else 0
            elapsed = time.perf_counter() - self.started
            left = self.total - self.done
            eta = elapsed / self.finished_here * left if self.finished_here else 0.0
            filled = round(20 * self.done / self.total)
            bar = "#" * filled + "." * (20 - filled)
            self.write(f"[study] {self.done}/{self.total} {plan.model} seed {plan.seed}: {headline(result)}"
                       f"{note}, {seconds:.0f} s  [{bar}] {100 * self.done / self.total:.0f} % "
                       f"ETA {_duration(eta)}")


def headline(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not finished"
    parts = []
    if "zeroshot" in result:
        parts.append(f"zero-shot {result['zeroshot']['top1_pct']:.1f} %")
    if "linear_probe" in result:
        parts.append(f"probe {result['linear_probe']['top1_pct']:.1f} %")
    parts.append(f"loss {result['train']['final_loss']:.3f}")
    return ", ".join(parts)


def _duration(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _print(line: str) -> None:
    print(line, flush=True)  # one line per finished run, visible at once in a log file too


def run_study(spec: StudySpec, *, jobs: int = 1, write: Callable[[str], None] = _print,
              stop_after: dict[str, int] | None = None) -> dict[str, Any]:
    """Train and evaluate every run that is not evaluated yet, then write the report; returns it.
    ``stop_after`` {run name: steps} interrupts those runs there (as an interruption would; for tests)."""
    plans = prepare(spec)
    progress = Progress(len(plans), write=write)
    todo = []
    for plan in plans:
        if run_status(plan) == "evaluated":
            progress.run_done(plan, _read_eval(plan), 0.0, " (already done)")
        else:
            todo.append(plan)
    if jobs <= 1:
        data = M.labelled_set(spec.eval, base_recipe(spec).data.fashion_mnist_root) if todo else None
        for plan in todo:
            t0 = time.perf_counter()
            finished = True
            status = run_status(plan)
            if status != "trained":
                recipe = plan.recipe
                if status == "new":  # nothing to resume (and no "no checkpoint yet" warning)
                    recipe = dataclasses.replace(recipe, resume=None)
                res = train(recipe, stop_after=(stop_after or {}).get(plan.name))
                finished = res.state.step >= res.total_steps and bool(res.exported)
            result = evaluate(spec, plan, data) if finished else None
            progress.run_done(plan, result, time.perf_counter() - t0)
    else:
        _run_parallel(spec, todo, jobs, progress)
    return collect(spec, evaluate_missing=False)


def slot_env(slot: int, jobs: int) -> tuple[dict[str, str], list[str]]:
    """Environment and train overrides of worker `slot`: one GPU each when there are GPUs, else a share of
    the CPU threads (OMP/MKL and torch's own count)."""
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})  # the run stops (and saves) if the study dies
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = str(slot % torch.cuda.device_count())
        return env, []
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env, [f"train.threads={threads}"]


def _run_logged(words: list[str], env: dict[str, str], log_path: Path, what: str) -> None:
    """Run one `msclip ...` command, its output streamed into `log_path` (a file, not a pipe: if the study
    dies, the run can still write its last lines while it saves and stops)."""
    cmd = [sys.executable, "-m", "msclip", *words[1:]]  # `msclip ...` as this interpreter's module
    mio.make_folder(log_path.parent)
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(words)}\n")
        log.flush()
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RunFailed(f"{what} failed (exit {code}); see {log_path}")


def _run_parallel(spec: StudySpec, todo: list[RunPlan], jobs: int, progress: Progress) -> None:
    slots = itertools.count()
    local = threading.local()

    def assign() -> None:
        local.slot = next(slots)

    def one(plan: RunPlan) -> tuple[RunPlan, float]:
        t0 = time.perf_counter()
        env, extra = slot_env(local.slot, jobs)
        if run_status(plan) != "trained":
            _run_logged(train_command(spec, plan, extra), env, plan.run_dir.parent / f"{plan.name}.train.log",
                        f"training {plan.name}")
        _run_logged(eval_command(spec, plan), env, plan.run_dir.parent / f"{plan.name}.eval.log",
                    f"evaluating {plan.name}")
        return plan, time.perf_counter() - t0

    errors = []
    with cf.ThreadPoolExecutor(max_workers=jobs, initializer=assign) as pool:
        for fut in cf.as_completed([pool.submit(one, p) for p in todo]):
            try:
                plan, seconds = fut.result()
                progress.run_done(plan, _read_eval(plan), seconds)
            except RunFailed as err:
                errors.append(str(err))
                progress.write(f"[study] {err}")
    if errors:
        raise RunFailed(f"{len(errors)} run(s) failed:\n" + "\n".join(errors))


def _read_eval(plan: RunPlan) -> dict[str, Any] | None:
    path = plan.run_dir / M.EVAL_FILE
    if not path.is_file():
        return None
    again = "delete it to evaluate the run again"
    try:
        result = mio.read_user_json(path, f"run {plan.name}'s evaluation")
    except MsclipError as err:
        raise MsclipError(f"{err}; {again}") from None
    if not isinstance(result, dict):
        raise MsclipError(f"{path}: run {plan.name}'s evaluation is a JSON object, got {type(result).__name__}; "
                          f"{again}")
    return result


def collect(spec: StudySpec, *, evaluate_missing: bool = True) -> dict[str, Any]:
    """The report from the run folders as they are (copied back from wherever they ran): trained but not
    evaluated runs are evaluated first (unless `evaluate_missing` is off); unfinished ones are listed."""
    plans = plan_runs(spec)
    results, missing = [], []
    data = None
    for plan in plans:
        status = run_status(plan)
        if status == "trained" and evaluate_missing:
            if data is None:
                data = M.labelled_set(spec.eval, plan.recipe.data.fashion_mnist_root)
            results.append(evaluate(spec, plan, data))
        elif status == "evaluated":
            results.append(_read_eval(plan))
        else:
            missing.append({"name": plan.name, "model": plan.model, "seed": plan.seed, "status": status})
    return build_report(spec, results, missing)
