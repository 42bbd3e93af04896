"""The run folder: one writer at a time (`RunFolderLock`), an earlier run refused unless resumed or
overwritten, and what an interrupted write left behind removed.

Two trainers on one folder (a study re-run while an orphaned run of the killed study still trains, the
same command typed twice) would interleave checkpoints and metrics. The lock is a POSIX record lock
(``lockf``) on ``FOLDER/.msclip-lock``: the kernel drops it when the process ends, ``kill -9`` included,
and forked children (the DataLoader workers, which outlive a killed trainer by a few seconds) do not
inherit it, so a killed run never leaves a lock behind and ``resume=latest`` works at once. It locks out
other processes only (a process does not conflict with its own record locks). Where ``fcntl`` does not
exist (Windows) runs are not locked.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType

from msclip.errors import MsclipError
from msclip.io import make_folder, remove_stale_temporaries
from msclip.train import distributed as D
from msclip.train.logger import metrics_files
from msclip.train.recipe import Recipe, save_recipe
from msclip.train.state import checkpoint_dir, list_checkpoints

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
LOCK_NAME = ".msclip-lock"


class RunInUseError(MsclipError):
    """Another process is training into this run folder."""


class RunFolderLock:
    """The lock of one run folder. `acquire` takes it or raises `RunInUseError` naming the folder and the
    holder's pid; `claim` then records this process as the holder; `release` (or the process's end) frees it.
    Nothing is written before `claim`, so a refused run leaves the folder as it found it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, create: bool) -> None:
        """Take the lock; with ``create=False`` a folder without a lock file is left alone (no process
        holds it: every holder made the file)."""
        if fcntl is None or self._fd is not None or not (create or self.path.is_file()):
            return
        fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(f"run folder {self.path.parent} is in use by another msclip process (pid {holder}); "
                                "nothing was changed. Wait for it to end or stop it, then resume with "
                                "resume=latest") from None
        self._fd = fd

    def claim(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the file stays: unlinking it would race a new holder
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunFolderLock":
        self.acquire(create=True)
        self.claim()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class RunFolderError(MsclipError):
    """The run folder already holds another run's checkpoints or exported weights."""


EXPORT_NAME = "model.safetensors"


def prepare_run_dir(run_dir: Path, recipe: Recipe, env: D.DistEnv, overwrite: bool,
                    held: contextlib.ExitStack) -> Path:
    """The run folder, with the resolved recipe in it (rank 0 writes; every rank agrees on the path).

    Rank 0 holds the folder's lock (`RunFolderLock`, released by ``held``) first: a folder another process
    trains into is refused. A folder holding an earlier run is refused unless resuming or ``overwrite`` (checked
    before anything in it changes); temporary files an interrupted write left behind are removed."""
    lock = RunFolderLock(run_dir)
    held.callback(lock.release)
    problem = ""
    if env.is_master:
        try:
            lock.acquire(create=False)  # before looking: a live writer would change what is seen
        except RunInUseError as err:
            problem = str(err)
        problem = problem or (reuse_problem(recipe, run_dir) if not overwrite else "")
    problem = D.broadcast_object(problem, env)
    if problem:
        raise RunFolderError(problem)
    if env.is_master:
        if overwrite and not recipe.resume:
            clear_previous_run(run_dir)
        make_folder(run_dir)
        lock.acquire(create=True)  # a new folder (a process that made it meanwhile gets the lock error)
        lock.claim()
        for folder in (run_dir, checkpoint_dir(run_dir)):
            for tmp in remove_stale_temporaries(folder):
                log.info("removed %s, a temporary file left by an interrupted write", tmp)
        save_recipe(recipe, run_dir / "recipe.yaml")
    D.barrier(env)
    return run_dir


def reuse_problem(recipe: Recipe, run_dir: Path) -> str:
    if recipe.resume:
        return ""
    held = [p.name for _, p in list_checkpoints(checkpoint_dir(run_dir))]
    if (run_dir / EXPORT_NAME).is_file():
        held.append(EXPORT_NAME)
    if not held:
        return ""
    shown = ", ".join(held[-3:]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
    return (f"run folder {run_dir} already holds an earlier run ({shown}); nothing was changed. "
            "Continue it with resume=latest, start a new one with another name=..., "
            "or replace it with --overwrite")


def clear_previous_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote here (checkpoints, export, metrics, TensorBoard events), so nothing of
    it mixes in; says so only when there was something to remove."""
    doomed = [p for _, p in list_checkpoints(checkpoint_dir(run_dir))]
    doomed += [p for p in (run_dir / EXPORT_NAME, *metrics_files(run_dir)) if p.is_file()]
    for path in doomed:
        path.unlink(missing_ok=True)
    events = run_dir / "tensorboard"
    if events.is_dir():
        shutil.rmtree(events, ignore_errors=True)
        doomed.append(events)
    if doomed:
        log.warning("overwrite: removed the earlier run's checkpoints, weights and metrics in %s", run_dir)
