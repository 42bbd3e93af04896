"""Train-state checkpoints: atomic write, keep the last K, ``latest`` resolution, RNG capture/restore.

A checkpoint holds the model (unwrapped state dict + its config), optimiser, scheduler, scaler, step, epoch,
position inside the epoch and the python/numpy/torch RNG state of every rank, so a resumed run continues
exactly where the interrupted one stopped. Everything is loadable with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from msclip.errors import MissingFileError, MsclipError
from msclip.io import make_folder, torch_save

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
FORMAT_VERSION = 1


class TrainStateError(MsclipError):
    """A train-state checkpoint cannot be used; the message names the file and why."""


def capture_rng() -> dict[str, Any]:
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses; store it as a tensor
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``folder``, oldest first (temp files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``latest`` -> newest checkpoint of this run (None when there is none yet); a folder -> its newest;
    a file -> itself."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir(run_dir))
        return found[-1][1] if found else None
    path = Path(resume)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(checkpoint_dir(path))
        if not found:
            raise MissingFileError(f"resume={resume}: no step_*.pt checkpoint in that folder")
        return found[-1][1]
    if not path.is_file():
        raise MissingFileError(f"resume={resume}: no such checkpoint file or folder")
    return path


def load_resume_state(resume: str, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``resume`` names, loaded and verified (readable, finite weights); None when
    ``latest`` finds no checkpoint yet. ``latest`` or a folder falls back from an unusable newest
    checkpoint (truncated, empty, non-finite) to the newest usable one and logs which it skipped and why."""
    first = resolve_resume(resume, run_dir)
    if first is None:
        return None
    if resume != "latest" and not Path(resume).is_dir():  # an explicit file: no silent substitute
        return first, load_train_state(first)
    candidates = [p for _, p in reversed(list_checkpoints(first.parent))]
    skipped: list[str] = []
    for path in candidates:
        try:
            state = load_train_state(path)
        except TrainStateError as err:
            skipped.append(str(err))
            continue
        for why in skipped:
            log.warning("resume: skipped %s; using %s instead", why, path)
        return path, state
    raise TrainStateError(f"resume={resume}: no usable checkpoint in {first.parent}: " + "; ".join(skipped))


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one device sync for all)."""
    names = [k for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    if not names:
        return []
    flags = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).cpu().tolist()
    return [k for k, ok in zip(names, flags) if not ok]


def save_train_state(path: str | Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``state`` atomically to ``path``, then keep it and the newest ``keep_last - 1`` checkpoints
    before it (0 = keep all). Checkpoints of later steps are left alone: they exist only when this run
    resumed from an earlier one (the resume skipped a damaged newest file, or was pointed at an older
    one), and pruning by step number there would delete the file just written."""
    path = Path(path)
    make_folder(path.parent)
    torch_save({"format_version": FORMAT_VERSION, **state}, path)
    if keep_last > 0:
        found = list_checkpoints(path.parent)
        step = next((s for s, p in found if p.name == path.name), None)
        older = [p for s, p in found if step is not None and s < step]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            old.unlink(missing_ok=True)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Load a train state; an unreadable (truncated, empty), foreign or non-finite file is a
    TrainStateError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise TrainStateError(f"{path}: the file is empty (an interrupted copy?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises zip, pickle, EOF and runtime errors for a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TrainStateError(f"{path}: unreadable, truncated or damaged ({type(err).__name__}: {first})") from err
    if not isinstance(state, dict) or "optimizer" not in state or "step" not in state:
        raise TrainStateError(f"{path} is not a msclip train-state checkpoint (use pretrained= for plain weights)")
    loss = state.get("loss") if isinstance(state.get("loss"), dict) else {}  # SigLIP's learnable bias
    bad = nonfinite_tensors({**(state.get("model") or {}), **{f"loss.{k}": v for k, v in loss.items()}})
    if bad:
        raise TrainStateError(f"{path}: {len(bad)} weight tensor(s) are non-finite (e.g. {bad[0]})")
    return state


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_model(ckpt: str | Path, saved_cfg: dict[str, Any] | None, cfg: dict[str, Any]) -> None:
    """A train state resumes only into the model it trained (its name aside): name the fields that differ,
    instead of load_state_dict's list of every missing and unexpected key."""
    if not saved_cfg:
        return
    was, now = _flat(saved_cfg), _flat(cfg)
    diff = sorted(k for k in was.keys() | now.keys() if k != "name" and was.get(k) != now.get(k))
    if diff:
        names = (f"model {was.get('name')!r} there, {now.get('name')!r} here: "
                 if was.get("name") != now.get("name") else "")
        shown = "; ".join(f"{k} {was.get(k)!r} there, {now.get(k)!r} here" for k in diff[:4])
        more = f"; and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise TrainStateError(f"{ckpt}: trained another model than this recipe's ({names}{shown}{more}); resume "
                              "with the run's own recipe.yaml, or start a new run with another name=...")


def load_part(ckpt: str | Path, what: str, load: Callable[[], Any]) -> None:
    """`load()` one part of a train state (model, loss, optimiser); a mismatch names the file and the part."""
    try:
        load()
    except (RuntimeError, ValueError, KeyError) as err:
        lines = [ln.strip() for ln in str(err).strip().splitlines()[:2]]  # torch's title line, then its first cause
        text = " ".join(lines)[:300] or type(err).__name__
        raise TrainStateError(f"{ckpt}: its {what} state does not fit this recipe's ({text})") from None
