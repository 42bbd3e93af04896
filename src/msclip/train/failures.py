"""Why a training run stops before its last step, other than a signal: each carries what the user needs next."""
from __future__ import annotations

from pathlib import Path

from msclip.errors import MsclipError


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


class DataWorkerDied(MsclipError):
    """A DataLoader worker process died (killed by the out-of-memory killer, say); ``checkpoint``: the step the
    loop saved on the way out (one process), or None (DDP: saving needs every rank)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.run_dir: Path | None = None  # set by the trainer


def worker_death(err: RuntimeError) -> str | None:
    """torch's text for a dead DataLoader worker ("... is killed by signal: Killed."), or None for other errors."""
    texts = [str(e) for e in (err.__cause__, err) if e is not None]
    if not any(t.startswith("DataLoader worker") for t in texts):
        return None
    return texts[0].splitlines()[0].strip()
