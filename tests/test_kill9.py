"""kill -9 of a real `msclip train` process right after a checkpoint inside epoch 1, with 2 data workers,
for CSV and for WebDataset; `resume=latest` must end with bitwise the weights and per-step losses of an
uninterrupted run (augmentation included: the model's random-resized-crop train transform)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msclip.train.main import train
from msclip.train.recipe import load_recipe
from msclip.train.run_folder import RunFolderError
from msclip.train.state import load_train_state
from proc_utils import spawn
from test_data_faults import good_csv, good_shards
from train_utils import tiny_recipe

STEPS, EVERY = 16, 8  # 24 pairs in batches of 4: 6 steps an epoch, so step 8 is inside epoch 1


def _overrides(kind: str, path: str, out: Path, name: str) -> list[str]:
    return [f"data.kind={kind}", f"data.path={path}", "data.num_samples=24", "data.batch_size=4", "data.workers=2",
            "model=clip-b32-tiny", f"train.steps={STEPS}", "train.precision=fp32", "train.deterministic=true",
            "train.threads=1", "optim.lr=1e-3", "optim.warmup=1", "seed=3", f"checkpoint.every={EVERY}",
            "checkpoint.keep_last=3", "log.every=1", "log.progress=false", "log.tensorboard=false",
            f"output_dir={out}", f"name={name}"]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {sorted(steps)}"
    return {r["step"]: r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r}


@pytest.mark.parametrize("kind", ["csv", "webdataset"])
def test_kill_9_after_a_checkpoint_in_epoch_1_resumes_bitwise(tmp_path: Path, kind: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = good_csv(data, n=24) if kind == "csv" else good_shards(data, n_shards=4, per_shard=6)
    ref = train(load_recipe(None, _overrides(kind, path, tmp_path, "ref")))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = spawn([sys.executable, "-m", "msclip", "train", *_overrides(kind, path, tmp_path, "killed")],
                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "killed" / "checkpoints" / f"step_{EVERY:08d}.pt"
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ckpt.is_file(), f"no checkpoint at step {EVERY}: {proc.stderr.read() if proc.poll() is not None else ''}"
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: whatever the process had not saved is lost
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert load_train_state(ckpt)["loop"]["epoch"] == 1

    resumed = train(load_recipe(None, _overrides(kind, path, tmp_path, "killed") + ["resume=latest"]))
    assert resumed.state.step == STEPS and resumed.start_step >= EVERY
    final, expected = (load_train_state(r.last_checkpoint)["model"] for r in (resumed, ref))
    assert expected.keys() == final.keys()
    assert all(torch.equal(final[k], v) for k, v in expected.items()), "weights differ from the uninterrupted run"
    assert _losses(tmp_path / "killed") == _losses(ref.run_dir), "per-step losses differ"


def test_a_run_folder_in_use_is_refused_until_its_writer_is_killed(tmp_path: Path) -> None:
    """A second trainer on a folder another process holds is refused, naming the holder, and changes nothing;
    once the holder is killed with -9 (no handler runs), the kernel has dropped its lock: resume works."""
    first = train(tiny_recipe(tmp_path, "busy", train__steps=2))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    holder = spawn([sys.executable, "-c", "import sys, time; from msclip.train.run_folder import RunFolderLock; "
                    "RunFolderLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(300)",
                    str(first.run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    before = {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")}
    in_use = rf"{first.run_dir} is in use by another msclip process \(pid {holder.pid}\)"
    with pytest.raises(RunFolderError, match=in_use):
        train(tiny_recipe(tmp_path, "busy", train__steps=4, resume="latest"))
    assert {p: p.stat().st_mtime_ns for p in first.run_dir.rglob("*")} == before
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    resumed = train(tiny_recipe(tmp_path, "busy", train__steps=4, resume="latest"))
    assert resumed.start_step == 2 and resumed.state.step == 4
