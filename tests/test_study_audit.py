"""Mutation-audit tests for the study package and the training loop's bookkeeping: the difference intervals
against the named baseline, the ranking order, seeds per run, collect evaluating trained runs, the final
loss and speed of a run, per-group schedules, clipping, the non-finite streak, metrics files and Ctrl-C.
Small hand-made inputs; tiny CPU runs of one to five steps."""
from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from msclip.study import metrics as M
from msclip.study import runner
from msclip.study.report import claims, summarise
from msclip.study.spec import StudyError, StudySpec, load_study, plan_runs
from msclip.study.stats import mean_std, welch_interval
from msclip.train.logger import RunLogger
from msclip.train.main import train
from msclip.train.scheduler import WarmupCosine
from msclip.train.state import list_checkpoints, load_train_state
from train_utils import tiny_recipe

# --- study report: baseline, sign, ranking ---------------------------------------------------------------

# zero-shot / probe values per seed: "mid" is the baseline, named second so that it is not models[0]
VALUES = {"low": [10.0, 12.0, 11.0], "mid": [20.0, 21.0, 23.0], "high": [30.0, 33.0, 31.0]}


def _result(model: str, seed: int, value: float) -> dict[str, Any]:
    shared = 0 if model == "mid" else 1_000_000
    return {"model": model, "seed": seed, "flops_per_pair": 1e9,
            "params": {"shared": shared, "image_only": 1_000_000, "text_only": 1_000_000, "other": 0,
                       "total": 2_000_000 + shared, "fraction_shared": shared / (2_000_000 + shared),
                       "trunk_fraction_shared": 0.5 if shared else 0.0},
            "train": {"loss_curve": [[1, 2.0], [2, 1.5]], "final_loss": 1.5, "steps": 2, "samples_per_s": 10.0},
            "zeroshot": {"top1_pct": value}, "linear_probe": {"top1_pct": value + 1.0},
            "modality": {"gap": value / 100.0, "layers": [{"layer": 0, "nmi": 0.5}]}}


def _spec(tmp_path: Path) -> StudySpec:
    return StudySpec(name="s", output_dir=str(tmp_path), models=["low", "mid", "high"], baseline="mid",
                     seeds=[0, 1, 2])


def _results() -> list[dict[str, Any]]:
    return [_result(m, s, v) for m, vals in VALUES.items() for s, v in enumerate(vals)]


def test_differences_are_variant_minus_the_named_baseline(tmp_path: Path) -> None:
    summary = summarise(_spec(tmp_path), _results())
    assert "diff_to_baseline" not in summary["mid"]["zeroshot"]  # the baseline has no difference to itself
    for model in ("low", "high"):
        d = summary[model]["zeroshot"]["diff_to_baseline"]
        want = welch_interval(VALUES[model], VALUES["mid"])  # against `baseline`, not models[0]
        assert d["diff"] == pytest.approx(mean_std(VALUES[model])[0] - mean_std(VALUES["mid"])[0])
        assert (d["low"], d["high"], d["df"]) == pytest.approx((want.low, want.high, want.df))
    assert summary["high"]["zeroshot"]["diff_to_baseline"]["diff"] > 0 > summary["low"]["zeroshot"][
        "diff_to_baseline"]["diff"]


def test_ranking_claim_names_the_best_first_and_orders_descending(tmp_path: Path) -> None:
    said = claims(_spec(tmp_path), summarise(_spec(tmp_path), _results()))
    zs = next(c for c in said if c.startswith("**Ranking (zero-shot)**"))
    assert "`high` ranks first with 31.3 %" in zs
    order = zs.split("Order: ")[1]
    assert order.index("`high`") < order.index("`mid`") < order.index("`low`")


def test_an_interval_wholly_below_zero_excludes_zero() -> None:
    # a variant clearly worse than the baseline is a clear difference too, not only a clearly better one
    worse = welch_interval([10.0, 11.0, 12.0], [20.0, 21.0, 22.0])
    assert worse.high is not None and worse.high < 0 and worse.excludes_zero is True
    assert welch_interval([20.0, 21.0, 22.0], [10.0, 11.0, 12.0]).excludes_zero is True
    assert welch_interval([10.0, 12.0, 14.0], [11.0, 12.0, 13.0]).excludes_zero is False


# --- study plan and spec -----------------------------------------------------------------------------

def test_each_seed_gets_its_own_run_and_recipe_seed(tmp_path: Path) -> None:
    spec = StudySpec(name="s", output_dir=str(tmp_path), models=["clip-b32-tiny"], seeds=[3, 7, 11])
    plans = plan_runs(spec)
    assert [(p.seed, p.recipe.seed, p.name) for p in plans] == [
        (3, 3, "clip-b32-tiny-seed3"), (7, 7, "clip-b32-tiny-seed7"), (11, 11, "clip-b32-tiny-seed11")]
    assert len({p.run_dir for p in plans}) == 3


def test_a_seed_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="a seed is listed twice"):
        load_study(overrides=[f"output_dir={tmp_path}", "models=[clip-b32-tiny]", "seeds=[0,0]",
                              "eval.data=synthetic", "recipe.train.steps=2"])
    assert not (tmp_path / "study").exists()


def test_collect_evaluates_trained_runs_that_were_not_evaluated(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder copied back with its weights but no study-eval.json: --collect measures it (the
    measurement itself is stubbed; what is checked is that collect asks for it and records it)."""
    spec = load_study(overrides=[f"output_dir={tmp_path}", "models=[clip-b32-tiny]", "seeds=[0]",
                                 "recipe.train.steps=2", "eval.data=synthetic", "eval.test_samples=4",
                                 "eval.probe_train_samples=4", "eval.modality_samples=4"])
    plan = plan_runs(spec)[0]
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "model.safetensors").write_bytes(b"")  # "trained": the exported weights are there
    asked: list[str] = []

    def measured(run_dir: Any, model: str, *args: Any, **kw: Any) -> dict[str, Any]:
        asked.append(str(run_dir))
        out = _result(model, 0, 50.0)
        del out["seed"]
        return out

    monkeypatch.setattr(M, "evaluate_run", measured)
    data = runner.collect(spec)
    assert asked == [str(plan.run_dir)] and not data["missing"] and len(data["runs"]) == 1
    assert json.loads((plan.run_dir / M.EVAL_FILE).read_text())["seed"] == 0


# --- a run's training summary --------------------------------------------------------------------------

def test_final_loss_is_the_tail_mean_and_speed_uses_every_invocation(tmp_path: Path) -> None:
    first = RunLogger(tmp_path, tensorboard=False)
    for step in range(1, 5):
        first.log("train", step, {"loss": float(step)})
    first.log("summary", 4, {"wall_s": 2.0, "samples": 32, "steps_total": 4})
    first.close()
    resumed = RunLogger(tmp_path, tensorboard=False, start_step=4)
    for step in range(5, 9):
        resumed.log("train", step, {"loss": float(step)})
    resumed.log("summary", 8, {"wall_s": 6.0, "samples": 64, "steps_total": 8})
    resumed.close()
    s = M.training_summary(tmp_path)
    assert s["final_loss"] == pytest.approx(sum(range(4, 9)) / 5)  # the last 5 logged losses
    assert s["train_wall_s"] == pytest.approx(8.0) and s["samples_per_s"] == pytest.approx(64 / 8.0)
    assert s["steps"] == 8 and s["invocations"] == 2


# --- schedule, parameter groups, clipping ---------------------------------------------------------------

def test_each_group_is_scheduled_from_its_own_base_lr() -> None:
    w = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": [w[0]], "lr": 1e-3}, {"params": [w[1]], "lr": 4e-3}], lr=1e-3)
    sched = WarmupCosine(opt, total=10, warmup=2, min_lr=0.0)
    for step in (1, 2, 5):
        sched.step(step)
        a, b = (g["lr"] for g in opt.param_groups)
        assert a > 0 and b == pytest.approx(4 * a), step  # the shared group keeps its own lr


def _weights(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_train_state(path)["model"].items() if v.is_floating_point()}


def test_gradient_clipping_limits_the_update(tmp_path: Path) -> None:
    """Adam normalises the gradient's scale away, except against eps: a gradient clipped to norm 1e-12
    gives updates ~1e-4 of the unclipped ones, so the weights barely move."""
    common = dict(train__steps=1, optim={"lr": 1e-3, "weight_decay": 0.0, "warmup": 0}, data__num_samples=8)
    start = _weights(train(tiny_recipe(tmp_path, "start", optim={"lr": 0.0, "weight_decay": 0.0, "warmup": 0},
                                      train__steps=1, data__num_samples=8)).last_checkpoint)
    free = _weights(train(tiny_recipe(tmp_path, "free", **common)).last_checkpoint)
    clipped = _weights(train(tiny_recipe(tmp_path, "clipped", train__grad_clip_norm=1e-12, **common)).last_checkpoint)
    moved = max(float((free[k] - start[k]).abs().max()) for k in start)
    moved_clipped = max(float((clipped[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4 and moved_clipped < moved * 1e-2, (moved, moved_clipped)


# --- non-finite steps -------------------------------------------------------------------------------

def test_a_good_step_ends_a_non_finite_streak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from msclip.loss import ClipLoss

    real = ClipLoss.forward
    calls = {"n": 0}

    def flaky(self, img, txt, scale):  # noqa: ANN001, ANN202 - test double: NaN on steps 2 and 4
        calls["n"] += 1
        loss = real(self, img, txt, scale)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    monkeypatch.setattr(ClipLoss, "forward", flaky)
    res = train(tiny_recipe(tmp_path, "apart", train__steps=5, train__max_nonfinite=2))  # never 2 in a row
    assert res.state.step == 5 and res.state.nonfinite_total == 2 and res.state.nonfinite_in_row == 0


# --- metrics files -------------------------------------------------------------------------------------

def test_metrics_reach_the_files_before_the_logger_closes(tmp_path: Path) -> None:
    """A killed run loses nothing already logged: each record is on disk as soon as it is logged."""
    logger = RunLogger(tmp_path, tensorboard=False)
    try:
        logger.log("train", 1, {"loss": 2.5, "lr/decay": 1e-3, "grad_norm": 0.7})
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(ln) for ln in lines] == [{"kind": "train", "step": 1, "loss": 2.5, "lr/decay": 1e-3,
                                                    "grad_norm": 0.7}]
        with open(tmp_path / "metrics-train.csv", newline="") as f:
            assert list(csv.DictReader(f)) == [{"kind": "train", "step": "1", "loss": "2.5", "lr/decay": "0.001",
                                               "grad_norm": "0.7"}]
    finally:
        logger.close()


def test_the_train_csv_has_every_logged_field_and_the_final_step(tmp_path: Path) -> None:
    res = train(tiny_recipe(tmp_path, "csv", train__steps=4, log={"every": 3, "progress": False,
                                                                 "tensorboard": False}))
    rows = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [3, 4]  # every 3 steps, and always the last
    with open(res.run_dir / "metrics-train.csv", newline="") as f:
        reader = csv.DictReader(f)
        body = list(reader)
    assert reader.fieldnames == list(train_rows[0]) and [r["step"] for r in body] == ["3", "4"]


# --- Ctrl-C -------------------------------------------------------------------------------------------

def test_ctrl_c_saves_the_step_it_stopped_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT during step 2 (sent to this process from inside the loss, so no timing is involved): the run
    finishes that step, writes its checkpoint though checkpoint.every=0, and returns saying why."""
    from msclip.loss import ClipLoss

    real = ClipLoss.forward
    calls = {"n": 0}

    def interrupted(self, img, txt, scale):  # noqa: ANN001, ANN202 - test double
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught by train's handler, not KeyboardInterrupt
        return real(self, img, txt, scale)

    monkeypatch.setattr(ClipLoss, "forward", interrupted)
    res = train(tiny_recipe(tmp_path, "ctrlc", train__steps=5))
    assert res.stopped_by == signal.SIGINT and res.state.step == 2 and not res.exported
    assert [s for s, _ in list_checkpoints(res.run_dir / "checkpoints")] == [2]
    assert load_train_state(res.last_checkpoint)["loop"]["step"] == 2
