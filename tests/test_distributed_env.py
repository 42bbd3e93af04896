"""Who-am-I detection for torchrun, plain srun and one process (environments monkeypatched, no processes
started), the rendezvous address under SLURM, the GPU a local rank takes, and one real 2-process job
started the way ``srun python -m msclip ...`` starts it (SLURM variables only, no torchrun)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msclip.device import pick_device
from msclip.errors import MsclipError
from msclip.train import distributed as D
from proc_utils import spawn
from torchrun_utils import SRC, free_port

ALL_VARS = (*D.TORCHRUN_VARS, *D.SLURM_VARS, "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID")
SLURM_4 = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}  # task 3 of 2 nodes x 2


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_launcher_variables(clean_env: pytest.MonkeyPatch) -> None:
    assert D.world_info() == D.WorldInfo(0, 0, 1, "single")
    env = D.init_distributed("cpu")  # no process group is started for one process
    assert (env.rank, env.local_rank, env.world_size, env.distributed) == (0, 0, 1, False)
    assert not torch.distributed.is_initialized()


def test_torchrun_variables() -> None:
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert D.world_info(env) == D.WorldInfo(5, 1, 8, "torchrun")


def test_plain_srun_uses_the_slurm_variables() -> None:
    assert D.world_info(SLURM_4) == D.WorldInfo(3, 1, 4, "slurm")


def test_torchrun_wins_over_slurm() -> None:
    # srun starts one torchrun per node: the SLURM variables describe the launchers (task 1 of 2), the
    # torchrun ones the worker (rank 3 of 4)
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
           "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}
    assert D.world_info(env) == D.WorldInfo(3, 1, 4, "torchrun")


@pytest.mark.parametrize("env,match", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, r"RANK, WORLD_SIZE set but LOCAL_RANK not"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, r"SLURM_PROCID, SLURM_NTASKS set but SLURM_LOCALID not"),
    ({"RANK": "x1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, r"RANK='x1' is not an integer"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, r"RANK=2 with WORLD_SIZE=2: the rank must be in 0\.\.1"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0: the number of processes must be >= 1"),
    ({"RANK": "1", "LOCAL_RANK": "2", "WORLD_SIZE": "4"}, r"LOCAL_RANK=2 with RANK=1"),
    ({"RANK": "3", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_WORLD_SIZE=2"),
    ({"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4"}, r"SLURM_PROCID=4 with SLURM_NTASKS=4"),
    ({"SLURM_PROCID": "1", "SLURM_LOCALID": "-1", "SLURM_NTASKS": "4"}, r"SLURM_LOCALID=-1 with SLURM_PROCID=1"),
])
def test_inconsistent_values_name_the_variable(env: dict, match: str) -> None:
    with pytest.raises(D.DistributedEnvError, match=match):
        D.world_info(env)


@pytest.mark.parametrize("nodelist,host", [
    ("node7", "node7"), ("gpu[003-004,9],cpu1", "gpu003"), ("a1,b[1-2]", "a1"), ("r[2-3]-n[05,07]", "r2-n05"),
    ("127.0.0.1", "127.0.0.1"), ("x[12]", "x12"),
])
def test_first_host_of_a_slurm_host_list(nodelist: str, host: str) -> None:
    assert D.first_host(nodelist) == host


def test_first_host_refuses_broken_lists() -> None:
    with pytest.raises(D.DistributedEnvError, match="unbalanced brackets"):
        D.first_host("gpu[01-02")


def test_rendezvous_address_under_slurm() -> None:
    # MASTER_* win; else the job's first node and a port derived from the job id (two jobs on one node differ)
    assert D.rendezvous_address({"MASTER_ADDR": "h1", "MASTER_PORT": "1234", "SLURM_JOB_NODELIST": "n[1-2]"}) \
        == ("h1", 1234)
    assert D.rendezvous_address({"SLURM_JOB_NODELIST": "gpu[08-09]", "SLURM_JOB_ID": "123457"}) \
        == ("gpu08", D.SLURM_PORT_BASE + 123457 % D.SLURM_PORT_SPAN)
    assert D.rendezvous_address({"SLURM_NODELIST": "c5", "MASTER_PORT": "29500"}) == ("c5", 29500)
    with pytest.raises(D.DistributedEnvError, match="MASTER_ADDR is unset and neither SLURM_JOB_NODELIST"):
        D.rendezvous_address({"MASTER_PORT": "29500"})
    with pytest.raises(D.DistributedEnvError, match="MASTER_PORT is unset"):
        D.rendezvous_address({"MASTER_ADDR": "h1"})
    with pytest.raises(D.DistributedEnvError, match="MASTER_PORT=70000 is not a TCP port"):
        D.rendezvous_address({"MASTER_ADDR": "h1", "MASTER_PORT": "70000"})


def test_torchrun_world_without_master_addr_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    with pytest.raises(D.DistributedEnvError, match="MASTER_ADDR and MASTER_PORT unset; launch with torchrun"):
        D.init_distributed("cpu")


def test_the_local_rank_picks_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda", 3) == torch.device("cuda", 3)
    assert pick_device("auto", 2) == torch.device("cuda", 2)
    assert pick_device("cuda:1", 3) == torch.device("cuda", 1)  # explicit wins
    with pytest.raises(MsclipError, match="local rank 5 needs GPU 5 but this process sees 4 GPUs"):
        pick_device("cuda", 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound to each task
    assert pick_device("cuda", 3) == torch.device("cuda", 0)


@pytest.mark.dist
def test_plain_srun_style_launch_forms_one_group(tmp_path: Path) -> None:
    """Two processes with only SLURM's variables, as ``srun --nodes 2 --ntasks-per-node 1 python ...`` gives
    them (global ranks 0 and 1, each local rank 0), and the job's node list: they find each other at
    MASTER_PORT on the first node and know their ranks."""
    script = Path(__file__).parent / "dist_scripts" / "multinode_check.py"
    base = {k: v for k, v in os.environ.items() if k not in ALL_VARS}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1",
                MASTER_PORT=str(free_port()), PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    procs = [spawn([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True, env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID="0"))
             for r in (0, 1)]
    outs = [p.communicate(timeout=90)[0] for p in procs]  # a hung one is killed with its group after the test
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    seen = json.loads((tmp_path / "ranks.json").read_text())
    assert seen == [{"rank": r, "local_rank": 0, "world_size": 2, "launcher": "slurm", "sum": 1} for r in (0, 1)]
