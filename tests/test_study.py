"""`msclip study` (issue 13): the smoke preset end to end, skip-finished / resume-interrupted reruns, printed
commands run by hand then --collect, the interval arithmetic, strict study files."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msclip.cli import main as cli_main
from msclip.study import runner
from msclip.study.report import role
from msclip.study.spec import StudyError, load_study
from msclip.study.stats import t_quantile, welch_interval
from msclip.train.state import checkpoint_dir, list_checkpoints
from proc_utils import run_logged, spawn
from train_utils import slow_steps_hook

SECTIONS = ["## Results", "## The paper's claims, measured", "## Plots", "Intervals: Welch t-interval"]
PLOTS = ["accuracy_vs_shared.png", "nmi_layers.png", "modality_gap.png", "loss_curves.png"]
# deterministic measurements (CPU, fp32, one thread): the same however the runs were launched
DETERMINISTIC = ("zeroshot", "probe", "gap", "final_loss")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    spec = load_study(preset="smoke", overrides=[f"output_dir={out}"])
    lines: list[str] = []
    data = runner.run_study(spec, write=lines.append)
    return spec, data, lines


def _counting_train(monkeypatch):
    calls = []
    real = runner.train

    def counted(recipe, **kw):
        result = real(recipe, **kw)
        calls.append((recipe.name, recipe.resume, result.start_step, result.state.step))
        return result

    monkeypatch.setattr(runner, "train", counted)
    return calls


def test_smoke_report_has_every_section(smoke):
    spec, data, lines = smoke
    report = (spec.out_dir / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for model in spec.models:
        assert f"`{model}`" in report
    for png in PLOTS:
        assert (spec.out_dir / png).stat().st_size > 1000, png
    saved = json.loads((spec.out_dir / "study.json").read_text())
    assert len(saved["runs"]) == 2 and not saved["missing"] and saved["claims"]
    run = saved["runs"][1]
    assert run["model"] == "msclip-b32-tiny"
    assert {"zeroshot", "linear_probe", "modality", "params", "flops_per_pair", "train"} <= set(run)
    assert run["params"]["shared"] > 0 and 0 < run["params"]["fraction_shared"] < 1
    assert saved["runs"][0]["params"]["shared"] == 0  # the two-tower baseline
    assert run["flops_per_pair"] > 0 and run["train"]["steps"] == 4 and math.isfinite(run["train"]["final_loss"])
    assert [r["layer"] for r in run["modality"]["layers"]] == list(range(6))
    assert len(lines) == 2 and all(f"{i + 1}/2" in ln and "ETA" in ln for i, ln in enumerate(lines))


def test_finished_runs_are_not_retrained(smoke, monkeypatch):
    spec, _, _ = smoke
    calls = _counting_train(monkeypatch)
    evals = sorted(spec.out_dir.glob("runs/*/study-eval.json"))
    before = [p.stat().st_mtime_ns for p in evals]
    lines: list[str] = []
    runner.run_study(spec, write=lines.append)
    assert calls == []
    assert [p.stat().st_mtime_ns for p in evals] == before  # not evaluated again either
    assert all("already done" in ln for ln in lines)


def test_interrupted_study_resumes(tmp_path, monkeypatch):
    spec = load_study(preset="smoke", overrides=[f"output_dir={tmp_path}", "models=[msclip-b32-tiny]"])
    calls = _counting_train(monkeypatch)
    data = runner.run_study(spec, write=lambda s: None, stop_after={"msclip-b32-tiny-seed0": 3})
    assert [m["status"] for m in data["missing"]] == ["partial"]  # a checkpoint at step 2, no weights
    assert "## Missing runs" in (spec.out_dir / "report.md").read_text()
    data = runner.run_study(spec, write=lambda s: None)
    assert calls[-1] == ("msclip-b32-tiny-seed0", "latest", 2, 4)  # resumed at the step-2 checkpoint
    assert not data["missing"] and len(data["runs"]) == 1


def test_printed_commands_run_by_hand_give_the_same_report(smoke, tmp_path, capsys):
    """One variant (each printed line starts two Python processes): its runs by hand, then --collect, give
    the in-process study's numbers and table row."""
    spec, data, _ = smoke
    model = "msclip-b32-tiny"
    args = ["study", "--preset", "smoke", f"output_dir={tmp_path}", f"models=[{model}]"]
    assert cli_main([*args, "--print-commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 1 and commands[0].startswith("msclip train --config ") \
        and f" && msclip study --config {tmp_path / 'smoke' / 'study.yaml'} --evaluate {model}-seed0" in commands[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for line in commands:  # as a scheduler would: a shell line each
        done = run_logged(["bash", "-c", line], env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert cli_main([*args, "--collect"]) == 0
    by_hand = json.loads((tmp_path / "smoke" / "study.json").read_text())["summary"][model]
    for key in DETERMINISTIC:
        assert by_hand[key]["values"] == pytest.approx(data["summary"][model][key]["values"], abs=1e-6), key

    def row(path: Path) -> list[str]:  # the model's table row without the speed column (the last)
        line = next(ln for ln in path.read_text().splitlines() if ln.startswith(f"| `{model}`"))
        return line.replace(" (baseline)", "").split(" | ")[:-1]

    mine, theirs = row(tmp_path / "smoke" / "report.md"), row(spec.out_dir / "report.md")
    assert [c for c in mine if "n/a" not in c and c != "—"] == [c for c in theirs if "n/a" not in c and c != "—"]


def test_welch_interval_matches_hand_computation():
    # a = 1, 2, 3 and b = 3, 4, 5: s^2 = 1 each, se = sqrt(1/3 + 1/3) = 0.816497, Welch df = 4 exactly,
    # t(0.975, 4) = 2.776445 (tables), so -2 +- 2.266958
    iv = welch_interval([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert iv.diff == -2.0 and iv.df == pytest.approx(4.0)
    assert (iv.low, iv.high) == pytest.approx((-4.266958, 0.266958), abs=1e-5)
    assert iv.text() == "-2.0 [-4.3, +0.3]" and iv.excludes_zero is False
    # unequal variances: a = 10, 12, 14, 16 (s^2 = 20/3), b = 1, 2 (s^2 = 1/2): se^2 = 5/3 + 1/4,
    # df = (23/12)^2 / ((5/3)^2 / 3 + (1/4)^2 / 1) = 3.8844
    iv = welch_interval([10.0, 12.0, 14.0, 16.0], [1.0, 2.0])
    assert iv.df == pytest.approx((23 / 12) ** 2 / ((5 / 3) ** 2 / 3 + 1 / 16), rel=1e-9)
    half = t_quantile(0.975, iv.df) * math.sqrt(23 / 12)
    assert (iv.low, iv.high) == pytest.approx((11.5 - half, 11.5 + half)) and iv.excludes_zero
    for df, t in ((1, 12.706205), (10, 2.228139), (30, 2.042272), (1000, 1.962339)):  # table values
        assert t_quantile(0.975, df) == pytest.approx(t, abs=2e-6)
    assert welch_interval([1.0], [2.0, 3.0]).text() == "-1.5 (n/a)"


def test_study_file_is_strict_and_checked_before_any_folder(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [clip-b32-tiny, no-such-model]\nseed: [0]\n"
                     "eval: {zeroshott: true}\nrecipe: {optim: {lrr: 1.0}, train: {steps: 2}}\n")
    with pytest.raises(StudyError) as err:
        load_study(study)
    msg = str(err.value)
    for part in ("'seed'", "did you mean 'seeds'", "eval.zeroshott", "optim.lrr", "did you mean 'lr'"):
        assert part in msg, part
    study.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [clip-b32-tiny, no-such-model]\n"
                     "recipe: {model: clip-b32, train: {steps: 2}}\n")
    with pytest.raises(StudyError, match="recipe.model: set by the study"):
        load_study(study)
    study.write_text(f"output_dir: {tmp_path / 'out'}\nmodels: [clip-b32-tiny, no-such-model]\n"
                     "recipe: {train: {steps: 2}}\neval: {data: synthetic}\n")
    with pytest.raises(StudyError, match="no-such-model"):
        load_study(study)
    assert not (tmp_path / "out").exists()
    assert cli_main(["study", "--config", str(study)]) == 2  # a user error: one line, exit 2


def test_model_roles():
    assert role("msclip-b32-es-tiny") == "msclip-b32-es" and role("clip-b32") == "clip-b32"


def test_jobs_get_a_share_of_the_cores_or_a_gpu_each(monkeypatch):
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    env, extra = runner.slot_env(1, 4)
    assert env["OMP_NUM_THREADS"] == "2" and extra == ["train.threads=2"]
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 2)
    assert [runner.slot_env(s, 2)[0]["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["0", "1", "0"]


def test_killing_the_study_stops_and_saves_its_runs_and_a_rerun_finishes_them(tmp_path, monkeypatch):
    """kill -9 of `msclip study --jobs 2`: its runs get SIGTERM instead of training on as orphans (which a
    re-run would find holding their folders), save the step they are in and stop; a re-run resumes them."""
    over = [f"output_dir={tmp_path}", "recipe.train.steps=12", "recipe.checkpoint.every=0"]  # saved: only at the stop
    # the killed processes' steps are slowed (12 x 0.5 s), so neither run can finish before the other has
    # started, however unevenly they start; the in-process re-run below trains at full speed
    hook = slow_steps_hook(tmp_path, 0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(Path(__file__).parents[1] / "src")])}
    study = spawn([sys.executable, "-m", "msclip", "study", "--preset", "smoke", "--jobs", "2", *over], env=env,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [tmp_path / "smoke" / "runs" / f"{m}-seed0" for m in ("clip-b32-tiny", "msclip-b32-tiny")]
    deadline = time.monotonic() + 120
    while not all((r / "metrics.jsonl").is_file() and (r / "metrics.jsonl").read_text() for r in runs):
        assert time.monotonic() < deadline and study.poll() is None, "the runs did not start"
        time.sleep(0.02)
    os.kill(study.pid, signal.SIGKILL)  # the study only: no handler of its runs
    study.wait(timeout=30)
    deadline = time.monotonic() + 90
    while _group_alive(study.pid):
        assert time.monotonic() < deadline, "the study's runs outlived it"
        time.sleep(0.05)
    for run in runs:
        steps = [s for s, _ in list_checkpoints(checkpoint_dir(run))]
        assert steps and max(steps) < 12, run
        assert "msclip train: stopped" in (run.parent / f"{run.name}.train.log").read_text(), run

    calls = _counting_train(monkeypatch)
    runner.run_study(load_study(preset="smoke", overrides=over), write=lambda line: None)
    assert sorted((name, start > 0, end) for name, _, start, end in calls) == [
        ("clip-b32-tiny-seed0", True, 12), ("msclip-b32-tiny-seed0", True, 12)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
