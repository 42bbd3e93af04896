"""Launch a real multi-process gloo job with torchrun from a test, with a failure message worth reading."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from proc_utils import kill_group, run_logged, spawn

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _excerpt(text: str, head: int = 4000, tail: int = 4000) -> str:
    """Start and end of a log: the first Python traceback is near the start, the launcher's summary at the end."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters ...]\n{text[-tail:]}"


def _env() -> dict[str, str]:
    """CPU only, one thread per rank, this checkout's sources first."""
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1",
                PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))


def run_torchrun(script_args: list[str], nproc: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on 127.0.0.1, CPU only, one thread per rank; asserts exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script_args]
    proc = run_logged(cmd, env=_env(), timeout=timeout)  # a hung rank is killed with its launcher
    assert proc.returncode == 0, (f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n"
                                  f"--- stderr ---\n{_excerpt(proc.stderr)}\n--- stdout ---\n{_excerpt(proc.stdout)}")
    return proc


def run_torchrun_nodes(script_args: list[str], nnodes: int = 2, nproc: int = 2,
                       timeout: float = 150) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun launchers started at once on this machine, as one would start them on separate
    nodes: ``--nnodes N --node_rank i`` and a c10d rendezvous at 127.0.0.1 (the first launcher to bind the
    port hosts the store). Asserts that every launcher exits 0; returns them in node order."""
    port, run_id = free_port(), uuid.uuid4().hex[:12]
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(i),
             "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
             "--rdzv_id", run_id, *script_args] for i in range(nnodes)]
    # Logs go to files: a launcher blocked on a full pipe while we wait for another would hang the job.
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [spawn(cmd, env=_env(), stdout=out, stderr=err, text=True) for cmd, (out, err) in zip(cmds, logs)]
    results = []
    try:
        for cmd, p, (out, err) in zip(cmds, procs, logs):
            p.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
            if p.returncode != 0:
                break
    finally:
        for p in procs:  # one launcher failed or hung: neither the others nor any rank is left waiting
            kill_group(p)
        for out, err in logs:
            out.close()
            err.close()
    for i, r in enumerate(results):
        assert r.returncode == 0, (f"node {i}: torchrun exited {r.returncode}: {' '.join(r.args)}\n"
                                   f"--- stderr ---\n{_excerpt(r.stderr)}\n--- stdout ---\n{_excerpt(r.stdout)}")
    return results
