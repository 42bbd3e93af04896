"""Two "nodes" x two processes on this machine: two torchrun launchers started at once with
``--nnodes 2 --node_rank 0/1`` and a c10d rendezvous at 127.0.0.1, running a real ``msclip train`` (gloo).
Four ranks x batch 1 x 2 accumulated micro-batches must train exactly like one process with batch 8: that
holds only if the data is sharded by the global rank (sharding by the local rank would feed both nodes the
same half of the data), the gradients are averaged over all four ranks, across the node boundary, and the
accumulation (DDP's no_sync on the first micro-batch) gives the big batch's gradients. After every step
each rank holds exactly the same weights (tests/dist_scripts/train_sync_check.py records them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from msclip.checkpoint import load_state_dict_file
from msclip.train.logger import read_metrics
from msclip.train.main import train
from msclip.train.state import load_train_state
from torchrun_utils import run_torchrun_nodes
from train_utils import TINY, tiny_recipe

STEPS = 2


@pytest.mark.dist
def test_two_nodes_of_two_processes_train_like_one_process(tmp_path: Path) -> None:
    one = train(tiny_recipe(tmp_path, "one", train__steps=STEPS, data__num_samples=32, data__batch_size=8))
    script = Path(__file__).resolve().parent / "dist_scripts" / "train_sync_check.py"
    run_torchrun_nodes([str(script), str(tmp_path), "train", "--model", TINY, "--name", "nodes",
                        "--output_dir", str(tmp_path), f"train.steps={STEPS}", "train.precision=fp32",
                        "train.threads=1", "train.deterministic=true", "train.accum_freq=2", "data.kind=synthetic",
                        "data.num_samples=32", "data.batch_size=1", "data.workers=0", "optim.lr=1e-3",
                        "optim.weight_decay=0.1", "optim.warmup=1", "checkpoint.every=1", "log.every=1",
                        "log.progress=false", "log.tensorboard=false"], nnodes=2, nproc=2)
    for step in range(1, STEPS + 1):
        ranks = [json.loads((tmp_path / f"rank{r}_step{step}.json").read_text()) for r in range(4)]
        assert all(r == ranks[0] for r in ranks), f"step {step}: the ranks' weights differ"
    run = tmp_path / "nodes"
    state = load_train_state(run / "checkpoints" / f"step_{STEPS:08d}.pt")
    assert state["world_size"] == 4 and len(state["rng"]) == 4  # one group of four ranks, not two of two
    assert state["loop"]["samples_seen"] == STEPS * 8
    assert (run / "recipe.yaml").is_file()  # rank 0 wrote the run folder once (the ranks agree on one folder)
    # the logged loss is the mean over ranks, i.e. the loss of the global batch of 8
    assert [r["loss"] for r in read_metrics(run, "train")] == \
        pytest.approx([r["loss"] for r in read_metrics(one.run_dir, "train")], abs=1e-5)
    ref, _ = load_state_dict_file(one.run_dir / "model.safetensors")
    got, _ = load_state_dict_file(run / "model.safetensors")
    assert ref.keys() == got.keys()
    worst = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref)
    assert worst < 1e-5, worst
