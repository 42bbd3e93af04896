"""Graceful stop: SIGINT / SIGTERM ask the training loop to stop at the next step boundary.

The loop then writes a checkpoint and returns; the command prints where it is and exits 128 + signal
(130 for Ctrl-C, 143 for SIGTERM, what a cluster sends on preemption). A second signal exits at once.
The previous handlers come back when training returns (it may run inside a larger program).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop.signum`` is 0 until a stop signal arrived."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:  # asked twice: no checkpoint, no clean-up
            sys.stderr.write(f"\nmsclip train: {signal.Signals(signum).name} again; exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 128 + signum


PARENT_ENV = "MSCLIP_STOP_WITH_PARENT"  # a parent's pid: `msclip study --jobs` sets it for every run it starts


def stop_with_parent_from_env(poll_s: float = 0.5) -> None:
    """With ``MSCLIP_STOP_WITH_PARENT=<pid>`` set (by the study runner), send this process one SIGTERM once
    that parent is gone, ``kill -9`` included: a trainer then saves its step and exits, instead of training
    on as an orphan that a re-run of the study would find holding the run folder. A daemon thread watches
    the parent pid (Linux's PR_SET_PDEATHSIG fires again for every thread of a dying multi-threaded
    parent, and a second SIGTERM means "exit without saving")."""
    pid = os.environ.pop(PARENT_ENV, "")  # this process's own children (data workers) need not know it
    if not pid.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(pid):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="msclip-stop-with-parent", daemon=True).start()
