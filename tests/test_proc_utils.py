"""The tests' child-process harness: a hung child and its grandchildren die at the timeout."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from proc_utils import kill_spawned, run_logged, spawn


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its reaper is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_timeout_kills_the_grandchildren_holding_the_output(tmp_path) -> None:
    # the grandchild keeps the child's stdout open: subprocess.run(capture_output=True) would wait for it
    script = f"sleep 300 & echo $! > {tmp_path / 'pid'}; echo started; wait"
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as err:
        run_logged(["bash", "-c", script], timeout=2)
    assert time.monotonic() - t0 < 30
    assert "started" in err.value.output
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_spawned_groups_are_killed_after_the_test() -> None:
    proc = spawn(["bash", "-c", "sleep 300 & wait"])
    kill_spawned()  # what the autouse fixture in conftest does after every test
    assert proc.poll() is not None
