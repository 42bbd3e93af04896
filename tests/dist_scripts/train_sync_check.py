"""Run under torchrun (gloo, CPU): ``train_sync_check.py OUT <msclip train arguments>`` runs ``msclip train``
with its checkpoint writer also recording each rank's own weights (a float64 sum per tensor) at every
checkpoint to ``OUT/rank<r>_step<s>.json``. Data-parallel training keeps every rank's weights identical; a
rank that trained on its own gradients would drift away from the others (each rank sees different data).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from msclip.cli import main as cli_main
from msclip.train import main

OUT = Path(sys.argv[1])
_write_checkpoint = main.CheckpointWriter.__call__


def write_and_record(self: main.CheckpointWriter, st: main.LoopState, epoch_rng: dict) -> str:
    path = _write_checkpoint(self, st, epoch_rng)
    sums = {name: float(t.double().sum()) for name, t in self.model.state_dict().items()}
    (OUT / f"rank{os.environ['RANK']}_step{st.step}.json").write_text(json.dumps(sums))
    return path


main.CheckpointWriter.__call__ = write_and_record  # every rank calls the writer (it gathers RNG states)
sys.exit(cli_main(sys.argv[2:]))
