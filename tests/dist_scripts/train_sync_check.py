"""Run under ``torchrun --nproc_per_node W`` (gloo, CPU): trains a tiny model for a few accumulated steps
with ``msclip.train.main.train`` and writes, at every checkpoint, each rank's own weights (a float64 sum per
tensor) to ``OUT/rank<r>_step<s>.json``. Data-parallel training keeps every rank's weights identical; a
rank that trained on its own gradients would drift away from the others (each rank sees different data).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from msclip.train import main
from msclip.train.recipe import recipe_from_dict

OUT = Path(sys.argv[1])
_write_checkpoint = main.CheckpointWriter.__call__


def write_and_record(self: main.CheckpointWriter, st: main.LoopState, epoch_rng: dict) -> str:
    path = _write_checkpoint(self, st, epoch_rng)
    sums = {name: float(t.double().sum()) for name, t in self.model.state_dict().items()}
    (OUT / f"rank{os.environ['RANK']}_step{st.step}.json").write_text(json.dumps(sums))
    return path


main.CheckpointWriter.__call__ = write_and_record  # every rank calls the writer (it gathers RNG states)
recipe = recipe_from_dict({
    "model": "clip-b32-tiny", "name": "sync", "output_dir": str(OUT), "seed": 0,
    "data": {"kind": "synthetic", "num_samples": 32, "batch_size": 4, "workers": 0},
    "optim": {"lr": 1e-3, "weight_decay": 0.1, "warmup": 0},
    "train": {"steps": 2, "accum_freq": 2, "precision": "fp32", "threads": 1},
    "checkpoint": {"every": 1, "keep_last": 2},
    "log": {"every": 1, "progress": False, "tensorboard": False},
}, source="train_sync_check")
main.train(recipe)
