"""Training under faults: NaN gradients behind a finite loss, damaged checkpoints and stale temporaries,
re-used run folders, SIGINT / SIGTERM, bad recipe values at the command line. Tiny models, CPU only."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msclip.train import loop as loop_mod
from msclip.train.loop import NonFiniteLossError, TrainLoop
from msclip.train.main import train
from msclip.train.state import list_checkpoints, load_train_state
from proc_utils import spawn
from train_utils import slow_steps_hook, tiny_recipe

EVERY_STEP = {"every": 1, "keep_last": 10}


def _ckpts(run_dir: Path) -> dict[int, Path]:
    return dict(list_checkpoints(run_dir / "checkpoints"))


# --- never a non-finite checkpoint -------------------------------------------------------------------

def _nan_grads_at(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """The loss stays finite but one parameter's gradient turns NaN on the given backward calls."""
    real = loop_mod.backward_accumulated
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):  # noqa: ANN001, ANN202 - test double
        loss = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            next(p for p in model.parameters() if p.grad is not None and p.ndim > 1).grad[0].fill_(float("nan"))
        return loss
    monkeypatch.setattr(loop_mod, "backward_accumulated", poisoned)


def test_nan_gradient_behind_finite_loss_skips_the_update_without_clipping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_grads_at(monkeypatch, {3})
    real_step = TrainLoop.train_step
    skipped = []

    def checked(self, micro):  # noqa: ANN001, ANN202 - a skipped step must change nothing
        before = (copy.deepcopy(self.unwrapped.state_dict()), copy.deepcopy(self.optimizer.state_dict()))
        result = real_step(self, micro)
        if not result.ok:
            skipped.append(self.state.step + 1)
            assert all(torch.equal(v, self.unwrapped.state_dict()[k]) for k, v in before[0].items())
            after = self.optimizer.state_dict()["state"]
            for i, s in before[1]["state"].items():
                assert all(torch.equal(s[k], after[i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
        return result
    monkeypatch.setattr(TrainLoop, "train_step", checked)

    res = train(tiny_recipe(tmp_path, "nangrad", train__steps=4, checkpoint=EVERY_STEP))  # no clipping
    assert skipped == [3] and res.state.nonfinite_total == 1 and len(res.losses) == 3
    assert sorted(_ckpts(res.run_dir)) == [1, 2, 4]  # the skipped step writes none
    for path in _ckpts(res.run_dir).values():
        load_train_state(path)  # raises on a non-finite weight


def test_diverging_gradients_stop_naming_a_finite_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_grads_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row.*step_00000002\.pt"):
        train(tiny_recipe(tmp_path, "diverge", train__steps=8, train__max_nonfinite=3, checkpoint=EVERY_STEP))
    found = _ckpts(tmp_path / "diverge")
    assert sorted(found) == [1, 2]
    assert all(torch.isfinite(v).all() for v in load_train_state(found[2])["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = TrainLoop.train_step

    def blow_up(self, micro):  # noqa: ANN001, ANN202 - an update that overflows the weights at step 3
        result = real_step(self, micro)
        if self.state.step == 2:
            with torch.no_grad():
                self.unwrapped.logit_scale.fill_(float("inf"))
        return result
    monkeypatch.setattr(TrainLoop, "train_step", blow_up)
    with pytest.raises(NonFiniteLossError, match=r"step 3: 1 weight tensor.*logit_scale.*step_00000002\.pt"):
        train(tiny_recipe(tmp_path, "inf", train__steps=5, checkpoint=EVERY_STEP))
    assert sorted(_ckpts(tmp_path / "inf")) == [1, 2]


# --- checkpoints that survive faults ------------------------------------------------------------------

def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = train(tiny_recipe(tmp_path, "fallback", train__steps=4, checkpoint=EVERY_STEP))
    found = _ckpts(first.run_dir)
    data = found[4].read_bytes()
    found[4].write_bytes(data[: len(data) // 2])  # truncated
    found[3].write_bytes(b"")  # empty
    stale = found[4].parent / ".msclip-tmp-step_00000005.pt.x1y2"  # a save killed half-way
    stale.write_bytes(b"partial")
    with caplog.at_level("WARNING"):
        res = train(tiny_recipe(tmp_path, "fallback", resume="latest", train__steps=5, checkpoint=EVERY_STEP))
    assert not stale.exists()
    assert len(res.losses) == 3  # resumed after step 2: steps 3..5 ran
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 2
    assert "step_00000004.pt: unreadable" in lines[0] and "using " + str(found[2]) in lines[0]
    assert "step_00000003.pt: the file is empty" in lines[1] and str(found[2]) in lines[1]


def test_an_explicit_damaged_checkpoint_is_an_error_naming_it(tmp_path: Path) -> None:
    from msclip.errors import MsclipError

    bad = tmp_path / "step_00000007.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MsclipError, match=r"step_00000007\.pt: unreadable"):
        train(tiny_recipe(tmp_path, "explicit", resume=str(bad)))


# --- run folders are never overwritten ----------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerunning_a_run_name_without_resume_fails_and_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from msclip.errors import MsclipError

    first = train(tiny_recipe(tmp_path, "taken", train__steps=2))
    before = _snapshot(first.run_dir)
    assert "model.safetensors" in before
    with pytest.raises(MsclipError, match=rf"run folder {first.run_dir} already holds.*resume=latest.*name=.*--overwrite"):
        train(tiny_recipe(tmp_path, "taken", train__steps=2))
    assert _snapshot(first.run_dir) == before
    again = train(tiny_recipe(tmp_path, "taken", train__steps=1), overwrite=True)
    assert sorted(_ckpts(again.run_dir)) == [1]
    with caplog.at_level("WARNING"):
        fresh = train(tiny_recipe(tmp_path, "typo", resume="latest", train__steps=1))
    assert fresh.state.step == 1
    assert any("has no checkpoint yet" in r.getMessage() and "typo" in r.getMessage() for r in caplog.records)


# --- graceful stop -------------------------------------------------------------------------------------

STEPS = 12
CLI_RECIPE = ["--model", "clip-b32-tiny", "data.kind=synthetic", "data.num_samples=48", "data.batch_size=8",
              "data.workers=0", f"train.steps={STEPS}", "train.precision=fp32", "train.deterministic=true",
              "train.threads=1", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.warmup=1", "seed=0",
              "checkpoint.every=0", "checkpoint.keep_last=2", "log.every=1", "log.progress=false",
              "log.tensorboard=false"]  # = tiny_recipe(train__steps=STEPS)


def _msclip(*args: str, first_on_path: Path | None = None, **kw: object) -> subprocess.Popen:
    path = [str(p) for p in (first_on_path, Path(__file__).parents[1] / "src") if p is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    return spawn([sys.executable, "-m", "msclip", *args], env=env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    res = train(tiny_recipe(tmp_path_factory.mktemp("ref"), "ref", train__steps=STEPS))
    return load_train_state(res.last_checkpoint)["model"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_checkpoints_the_current_step_and_resumes_exactly(
        tmp_path: Path, sig: int, code: int, uninterrupted: dict[str, torch.Tensor]) -> None:
    run_dir = tmp_path / "sig"
    # steps slowed to 0.3 s in the child: the signal surely lands mid-run (12 steps, resumed in-process at speed)
    proc = _msclip("train", *CLI_RECIPE, f"output_dir={tmp_path}", "name=sig",
                   first_on_path=slow_steps_hook(tmp_path, 0.3))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.is_file() and metrics.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first step is done
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Traceback" not in out
    step = max(s for s, _ in list_checkpoints(run_dir / "checkpoints"))
    assert 1 <= step < STEPS
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in rows) == step  # stopped after finishing the step it was in, and saved it
    stop_lines = [line for line in err.splitlines() if line.startswith("msclip train: stopped")]
    assert len(stop_lines) == 1
    assert f"step_{step:08d}.pt" in stop_lines[0] and "name=sig resume=latest" in stop_lines[0]
    assert f"output_dir={tmp_path}" in stop_lines[0]

    resumed = train(tiny_recipe(tmp_path, "sig", resume="latest", train__steps=STEPS))
    assert resumed.state.step == STEPS and len(resumed.losses) == STEPS - step
    final = load_train_state(resumed.last_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in uninterrupted.items())


def test_train_restores_the_previous_signal_handlers(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(tiny_recipe(tmp_path, "handlers", train__steps=1))
    assert {s: signal.getsignal(s) for s in before} == before


# --- bad recipe values at the command line ---------------------------------------------------------------

@pytest.mark.parametrize("override,field", [
    ("train.steps=0", "train.steps"), ("log.every=0", "log.every"), ("train.threads=-2", "train.threads"),
    ("train.epochs=0", "train.epochs"), ("train.grad_clip_norm=-1", "train.grad_clip_norm"),
    ("optim.weight_decay=-0.1", "optim.weight_decay")])
def test_bad_training_values_are_refused_before_a_run_folder_exists(
        tmp_path: Path, capsys: pytest.CaptureFixture, override: str, field: str) -> None:
    from msclip.cli import main

    steps = "train.steps=null" if override.startswith("train.epochs") else "train.steps=2"
    code = main(["train", "--model", "clip-b32-tiny", "data.kind=synthetic", f"output_dir={tmp_path}",
                 "name=bad", steps, override])
    err = capsys.readouterr().err
    assert code == 2 and f"{field}=" in err and "must be" in err
    assert not (tmp_path / "bad").exists()


def test_a_killed_data_worker_stops_cleanly_after_checkpointing_its_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict[str, torch.Tensor]) -> None:
    """kill -9 of a DataLoader worker (the out-of-memory killer's usual victim) in the second epoch: the run
    saves the last finished step, stops with DataWorkerDied naming it (no traceback), and resume=latest
    reproduces the uninterrupted weights exactly."""
    from torch.utils.data import get_worker_info

    from msclip.data.mapstyle import SyntheticCaptions
    from msclip.train.failures import DataWorkerDied

    real, marker = SyntheticCaptions.__getitem__, tmp_path / "killed-once"

    def dies_in_epoch_1(self, key):  # noqa: ANN001, ANN202 - runs in the (forked) worker
        if get_worker_info() is not None and key[0] == 1 and not marker.exists():
            marker.touch()
            time.sleep(1.0)  # the trainer drains the prefetched batches and waits for data
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)

    monkeypatch.setattr(SyntheticCaptions, "__getitem__", dies_in_epoch_1)
    with pytest.raises(DataWorkerDied, match=r"data loader worker died at step (\d+) .*killed by signal.*"
                                             r"checkpointed to .*step_000000\d\d\.pt.*data\.workers") as info:
        train(tiny_recipe(tmp_path, "wk", train__steps=STEPS, data__workers=1))
    saved = max(_ckpts(tmp_path / "wk"))
    assert 6 <= saved < STEPS and info.value.checkpoint.endswith(f"step_{saved:08d}.pt")
    assert info.value.run_dir == tmp_path / "wk"
    monkeypatch.undo()
    resumed = train(tiny_recipe(tmp_path, "wk", resume="latest", train__steps=STEPS, data__workers=1))
    assert resumed.state.step == STEPS and resumed.start_step == saved
    final = load_train_state(resumed.last_checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in uninterrupted.items())


def test_resuming_into_another_model_or_loss_names_the_checkpoint_and_the_difference(tmp_path: Path) -> None:
    """resume=latest with a recipe that builds another model (or loss) is a TrainStateError naming the checkpoint,
    both model names and the differing fields, not load_state_dict's raw list of keys; the run is untouched."""
    from msclip.train.state import TrainStateError

    first = train(tiny_recipe(tmp_path, "r", train__steps=2))
    before = {p.name: p.read_bytes() for p in (first.run_dir / "checkpoints").iterdir()}
    with pytest.raises(TrainStateError, match=r"step_00000002\.pt: trained another model than this recipe's "
                                              r"\(model 'clip-b32-tiny' there, 'msclip-s-b32-tiny' here: .* more\)"):
        train(tiny_recipe(tmp_path, "r", resume="latest", model="msclip-s-b32-tiny", train__steps=4))
    with pytest.raises(TrainStateError, match=r"step_00000002\.pt: its loss state does not fit.*logit_bias"):
        train(tiny_recipe(tmp_path, "r", resume="latest", train__steps=4, train__loss="siglip"))
    assert {p.name: p.read_bytes() for p in (first.run_dir / "checkpoints").iterdir()} == before
