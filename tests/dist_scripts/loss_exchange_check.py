"""Run under ``torchrun --nproc_per_node W`` (gloo, CPU): the distributed exchange of both losses of
msclip/loss.py (ClipLoss's all-gather, SigLipLoss's ring), each against one process on the global batch
(``clip_loss_check.py``, ``siglip_check.py``). Rank 0 writes the max abs differences over ranks as JSON:
{"world_size", "clip": {check: {quantity: diff}}, "siglip": {quantity: diff}}. One launch for both, since
starting W interpreters costs more than the checks.
"""
from __future__ import annotations

import json
import os
import sys

import clip_loss_check
import siglip_check
import torch
import torch.distributed as dist


def _max_over_ranks(res: dict[str, float]) -> dict[str, float]:
    for k, v in res.items():  # every rank's numbers must hold
        t = torch.tensor(v, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res[k] = t.item()
    return res


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    clip = {name: _max_over_ranks(res) for name, res in clip_loss_check.results(rank, world).items()}
    siglip = _max_over_ranks(siglip_check.results(rank, world))
    if rank == 0:
        tmp = sys.argv[1] + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"world_size": world, "torch": torch.__version__, "clip": clip, "siglip": siglip}, f, indent=1)
        os.replace(tmp, sys.argv[1])
    dist.barrier()  # tear down in step: no rank leaves while a peer still has gloo work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter finalisation: under load, gloo's worker threads still holding autograd all-gather work
    # aborted a rank there once ("terminate called without an active exception", exit -6) after every
    # result was written and the group destroyed. The checks are done; nothing is left to flush.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
