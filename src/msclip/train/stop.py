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
