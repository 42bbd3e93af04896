"""Launch a real multi-process gloo job with torchrun from a test, with a failure message worth reading."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def run_torchrun(script_args: list[str], nproc: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` on 127.0.0.1, CPU only, one thread per rank; asserts exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"torchrun exited {proc.returncode}: {' '.join(cmd)}\n"
                                  f"--- stderr ---\n{_excerpt(proc.stderr)}\n--- stdout ---\n{_excerpt(proc.stdout)}")
    return proc
