"""What `init_distributed` hands to the process group (device by local rank, backend by device, the SLURM
rendezvous with the global rank), its check of the environment against an existing group, and distinct
resampled WebDataset shard streams per rank. In-process: the process-group start is recorded, not run, or
the group is a real single-process gloo group."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torchvision.transforms as T
from PIL import Image

from byte_tokenizer import byte_tokenize, decode
from msclip.data import DataSpec, build_train_data
from msclip.train import distributed as D
from shard_utils import write_tar

ALL_VARS = (*D.TORCHRUN_VARS, *D.SLURM_VARS, "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID")


@pytest.fixture()
def recorded_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A clean launcher environment and an `init_process_group` that only records its arguments (so no
    group exists afterwards and `init_distributed` returns what the environment said)."""
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list[torch.device]:
    """Pretend this process sees ``count`` GPUs; returns the devices passed to ``torch.cuda.set_device``."""
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def test_torchrun_worker_takes_its_local_rank_gpu_and_nccl(recorded_init: list, monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 3 of 2 nodes x 2: the second process of node 1 must take GPU 1 of its node, not GPU 3
    chosen = fake_gpus(monkeypatch, 2)
    set_env(monkeypatch, RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    env = D.init_distributed("auto")
    assert env.device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "torchrun")
    assert len(recorded_init) == 1
    assert recorded_init[0]["backend"] == "nccl" and recorded_init[0]["device_id"] == torch.device("cuda", 1)
    assert "init_method" not in recorded_init[0]  # torchrun's env:// store


def test_cpu_worker_uses_gloo(recorded_init: list, monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29512")
    env = D.init_distributed("cpu")
    assert env.device == torch.device("cpu")
    assert recorded_init == [{"backend": "gloo"}]  # no device_id for a CPU group


def test_plain_srun_rendezvous_uses_the_global_rank(recorded_init: list, monkeypatch: pytest.MonkeyPatch) -> None:
    # task 3 of 4 (local id 1 on the second node): the store is the job's first node, the rank the global one
    chosen = fake_gpus(monkeypatch, 2)
    set_env(monkeypatch, SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NTASKS="4",
            SLURM_JOB_NODELIST="gpu[08-09]", SLURM_JOB_ID="123457")
    env = D.init_distributed("cuda")
    port = D.SLURM_PORT_BASE + 123457 % D.SLURM_PORT_SPAN
    assert chosen == [torch.device("cuda", 1)] and env.device == torch.device("cuda", 1)
    assert recorded_init == [{"backend": "nccl", "device_id": torch.device("cuda", 1),
                              "init_method": f"tcp://gpu08:{port}", "rank": 3, "world_size": 4}]
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 4, "slurm")


def test_environment_contradicting_the_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group already formed (here: one gloo process) whose rank / size differ from the launcher's
    variables: refused, naming the variables, instead of training with a wrong data shard."""
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    set_env(monkeypatch, RANK="1", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29513")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(D.DistributedEnvError,
                           match=r"process group has rank 0 of 1 but the environment says RANK=1, WORLD_SIZE=2"):
            D.init_distributed("cpu")
    finally:
        dist.destroy_process_group()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 29 % 256, 90, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_resampled_ranks_draw_their_own_shards(tmp_path: Path) -> None:
    """Resampled shards (with replacement): each rank has its own seeded draw, so two ranks do not read
    the same shard sequence (which would make a 2-rank job see half the distinct data)."""
    for s in range(8):
        members = [m for i in range(2) for m in ((f"{s}{i}.png", _png(i)), (f"{s}{i}.txt", f"s{s} i{i}".encode()))]
        write_tar(tmp_path / f"r-{s}.tar", members)  # a sample's files are consecutive in its tar
    spec = DataSpec("webdataset", path=f"{tmp_path}/r-{{0..7}}.tar", num_samples=32, resampled=True,
                    shuffle_buffer=0)  # no sample shuffle: the captions follow the drawn shards
    seqs = []
    for rank in (0, 1):
        info = build_train_data(spec, image_transform=T.ToTensor(), tokenizer=byte_tokenize, batch_size=2,
                                workers=0, rank=rank, world_size=2, seed=0)
        info.set_epoch(0)
        caps = [c for _, tokens in info.loader for c in decode(tokens)]
        assert len(caps) == 16
        seqs.append([c.split()[0] for c in caps[::2]])  # the shard of each drawn pair
    assert seqs[0] != seqs[1], seqs
