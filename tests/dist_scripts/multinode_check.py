"""Run by each process of a multi-process launch (torchrun, or srun-style SLURM variables only): forms the
group with ``msclip.train.distributed.init_distributed`` and writes, from rank 0, what every rank believes
it is plus an all-reduced sum of the ranks to ``OUT/ranks.json`` (a real collective, not just the env)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from msclip.train import distributed as D

env = D.init_distributed("cpu")
total = torch.tensor(env.rank)
dist.all_reduce(total)
mine = {"rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size, "launcher": env.launcher,
        "sum": int(total)}
everyone: list = [None] * env.world_size
dist.all_gather_object(everyone, mine)
if env.is_master:
    out = Path(sys.argv[1]) / "ranks.json"
    out.with_suffix(".tmp").write_text(json.dumps(everyone))
    os.replace(out.with_suffix(".tmp"), out)
dist.barrier()  # nobody leaves while a peer still has gloo work in flight
D.cleanup(env)
