"""Child processes of the tests that can never outlive a timeout.

Each child starts in its own session (process group). On a timeout, or when the test fails, the whole group
is killed, so a launcher's workers (torchrun ranks, DataLoader workers, a shell's children) go with it.
Output goes to temporary files, not pipes: a pipe that an orphaned grandchild still holds keeps
``communicate()`` waiting after the child itself was killed, which is how a suite hangs until CI's limit.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from typing import Any

_SPAWNED: list[subprocess.Popen] = []


def spawn(cmd: list[str], **popen_kw: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new process group (killable as a whole with `kill_group`). Every group
    spawned during a test is killed when the test ends (`kill_spawned`, an autouse fixture in conftest)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
    _SPAWNED.append(proc)
    return proc


def kill_spawned() -> None:
    while _SPAWNED:
        kill_group(_SPAWNED.pop())


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (it may be gone already), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_logged(cmd: list[str], *, timeout: float, **popen_kw: Any) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` but hang-proof:
    on a timeout the whole process group is killed and ``subprocess.TimeoutExpired`` carries the output so far
    (whatever of the group outlives a finished child goes at the end of the test, with `kill_spawned`).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = spawn(cmd, stdout=out, stderr=err, text=True, **popen_kw)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            timed_out = True
        else:
            timed_out = False
        out.seek(0)
        err.seek(0)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=out.read(), stderr=err.read())
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
