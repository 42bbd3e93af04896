"""Frozen-feature extraction (batched, optional bf16, progress bar) with an on-disk cache.

Base datasets return ``(PIL image, label)``; `SafeDataset` applies the transform and turns any decode
failure into a skip that is counted (never silent). The cache file is keyed by a hash of
(model name, checkpoint path + mtime + size, dataset name, split, root, extra), so a changed checkpoint
or a different preprocessing never reuses stale features; writes are atomic.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger("msclip.eval")
CACHE_ENV = "MSCLIP_FEATURE_CACHE"


class SafeDataset(Dataset):
    """Items are (index, image tensor or None, label, error or None); a failure never raises."""

    def __init__(self, base: Any, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        try:
            image, label = self.base[i]
            return i, self.transform(image), label, None
        except Exception as e:  # noqa: BLE001 - any read/decode/transform failure skips this sample
            return i, None, None, f"{type(e).__name__}: {e}"


def collate_safe(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, list]:
    """-> (images [n_ok, ...] or None, labels or None, indices [n_ok], [(index, error), ...])."""
    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3]) for it in items if it[1] is None]
    if not ok:
        return None, None, torch.zeros(0, dtype=torch.long), failures
    labels = [it[2] for it in ok]
    lab = torch.stack([torch.as_tensor(v) for v in labels]) if labels[0] is not None else None
    return torch.stack([it[1] for it in ok]), lab, torch.tensor([it[0] for it in ok]), failures


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast; on CPU under no_grad (inference_mode + CPU autocast is slower than fp32)."""
    grad = torch.inference_mode() if device.type == "cuda" else torch.no_grad()
    if not bf16:
        return grad
    stack = contextlib.ExitStack()
    stack.enter_context(grad)
    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    return stack


def extract(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, device: torch.device,
            batch_size: int = 64, workers: int = 0, bf16: bool = False, progress: bool | None = None,
            desc: str = "features") -> dict[str, Any]:
    """Run `encode` over a SafeDataset. Returns {"features" float32 [N, E], "labels", "indices", "skipped",
    "skipped_examples"}; features are on the CPU, in dataset order minus the skipped samples."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_safe, pin_memory=device.type == "cuda")
    feats, labels, indices, failures = [], [], [], []
    # progress None: tqdm decides (shown on a terminal only)
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if progress is None else not progress)
    with autocast_context(device, bf16):
        for images, lab, idx, fail in bar:
            failures += fail
            if images is None:
                continue
            feats.append(encode(images.to(device, non_blocking=True)).float().cpu())
            indices.append(idx)
            if lab is not None:
                labels.append(lab)
    for i, err in failures[:5]:
        log.warning("skipped sample %d of %s: %s", i, desc, err)
    if not feats:
        raise ValueError(f"{desc}: no sample could be read ({len(failures)} failed; first: "
                         f"{failures[0][1] if failures else 'dataset is empty'})")
    return {"features": torch.cat(feats), "labels": torch.cat(labels) if labels else None,
            "indices": torch.cat(indices), "skipped": len(failures),
            "skipped_examples": [f"{i}: {e}" for i, e in failures[:20]]}


# ------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "msclip" / "features")


def checkpoint_identity(path: str | None) -> str:
    if path is None:
        return "random-init"
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}"


def cache_key(model_name: str, checkpoint: str | None, dataset: str, split: str, root: str,
              extra: dict | None = None) -> str:
    ident = {"model": model_name, "checkpoint": checkpoint_identity(checkpoint), "dataset": dataset,
             "split": split, "root": os.path.abspath(root) if root else "", "extra": extra or {}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def cached(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], dict],
           name: str = "features") -> tuple[dict, bool]:
    """Return (result, hit). Loads `<cache_dir>/<name>-<key>.pt` if present, else computes and stores it
    atomically (tmp file + os.replace). `cache_dir=None` disables caching."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("feature cache %s unreadable (%s); recomputing", path, e)
    result = compute()
    from msclip.checkpoint import atomic_save

    atomic_save(result, path)
    return result, False
