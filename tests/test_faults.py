"""Training under faults: NaN gradients behind a finite loss, damaged checkpoints and stale temporaries,
re-used run folders, SIGINT / SIGTERM, bad recipe values at the command line. Tiny models, CPU only."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from msclip.train import loop as loop_mod
from msclip.train.loop import NonFiniteLossError, TrainLoop
from msclip.train.main import train
from msclip.train.state import list_checkpoints, load_train_state
from train_utils import tiny_recipe

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
