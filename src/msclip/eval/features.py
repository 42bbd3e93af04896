"""The one feature-extraction loop for images and the one for texts, used by every frozen-model evaluation
(zero-shot, linear probe, retrieval, embed, analyze), plus the on-disk feature cache of the linear probe.

Images: base datasets return ``(PIL image, label)``; `SafeDataset` applies the transform and turns any read,
decode or transform failure into a skip that is counted and listed (never silent, never a crash).
Texts: tokenised a chunk at a time and encoded in length-sorted batches, so each batch is cut to its longest
text inside `encode_text` (exact: the text transformer is causal and pooled at the end token).
Both run without autograd, with an optional autocast (bf16), and show a progress bar on a terminal.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from msclip import io as mio
from msclip.errors import MsclipError
from msclip.transforms import decode_error_text

log = logging.getLogger(__name__)
CACHE_ENV = "MSCLIP_FEATURE_CACHE"
Autocast = Callable[[], ContextManager]


# ------------------------------------------------------------------------- shared pieces
def progress_bar(total: int, desc: str, unit: str, enabled: bool | None):
    """tqdm bar; `enabled=None` lets tqdm decide (shown on a terminal, hidden when stderr is a file)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


def bf16_autocast(device: torch.device | str) -> Autocast:
    """An autocast factory for bf16 on `device` (the linear probe's and retrieval's `--amp`)."""
    kind = torch.device(device).type
    return lambda: torch.autocast(device_type=kind, dtype=torch.bfloat16)


def no_grad_context(device: torch.device | str, autocast: Autocast | None) -> contextlib.ExitStack:
    """inference_mode, except under CPU autocast where it was measured slower than no_grad; plus autocast."""
    stack = contextlib.ExitStack()
    cpu_amp = autocast is not None and torch.device(device).type == "cpu"
    stack.enter_context(torch.no_grad() if cpu_amp else torch.inference_mode())
    if autocast is not None:
        stack.enter_context(autocast())
    return stack


# ------------------------------------------------------------------------- images
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
            return i, None, None, decode_error_text(e)


class NoReadableImages(MsclipError):
    """Every image of a dataset failed to decode (the failures are counted in the message)."""


@dataclass
class Batch:
    images: torch.Tensor | None  # [n_ok, 3, H, W] or None when every item failed
    labels: torch.Tensor | None  # [n_ok, ...] or None for unlabelled data
    indices: torch.Tensor  # [n_ok] dataset indices of the loaded images
    failures: list[tuple[int, str]] = field(default_factory=list)  # (dataset index, error)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate_skip(items: list) -> Batch:
    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[3]) for it in items if it[1] is None]
    if not ok:
        return Batch(None, None, torch.zeros(0, dtype=torch.long), failures)
    labels = [it[2] for it in ok]
    lab = torch.stack([torch.as_tensor(v) for v in labels]) if labels[0] is not None else None
    return Batch(torch.stack([it[1] for it in ok]), lab, torch.tensor([it[0] for it in ok]), failures)


def image_loader(dataset: SafeDataset, batch_size: int, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip,
                      pin_memory=pin_memory, drop_last=False)


def extract_image_features(encode: Callable[[torch.Tensor], torch.Tensor], dataset: SafeDataset,
                           device: torch.device | str, *, batch_size: int = 64, workers: int = 0,
                           autocast: Autocast | None = None, progress: bool | None = None, desc: str = "images",
                           keep_dtype: bool = False, allow_empty: bool = False) -> dict[str, Any]:
    """Run `encode` over every loadable image of `dataset`.

    Returns {"features" [N_ok, E] on the CPU (float32 unless `keep_dtype`), "labels" (or None), "indices" (dataset
    indices of the rows), "skipped" (count), "failures" [(index, error)], "skipped_examples" (first 20 as text),
    "seconds"}. Raises when no image could be read, unless `allow_empty`."""
    device = torch.device(device)
    loader = image_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    feats, labels, indices, failures = [], [], [], []
    t0 = time.perf_counter()
    with progress_bar(len(dataset), desc, "img", progress) as bar, no_grad_context(device, autocast):
        for batch in loader:
            failures += batch.failures
            if batch.images is not None:
                f = encode(batch.images.to(device, non_blocking=True))
                feats.append((f if keep_dtype else f.float()).cpu())
                indices.append(batch.indices)
                if batch.labels is not None:
                    labels.append(batch.labels)
            bar.update(len(batch.indices) + len(batch.failures))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for i, err in failures[:5]:
        log.warning("skipped sample %d of %s: %s", i, desc, err)
    if not feats and not allow_empty:
        raise NoReadableImages(f"{desc}: no image could be read ({len(failures)} failed; first: "
                               f"{failures[0][1] if failures else 'the dataset is empty'})")
    return {"features": torch.cat(feats) if feats else torch.zeros(0, 0),
            "labels": torch.cat(labels) if labels else None,
            "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
            "skipped": len(failures), "failures": failures,
            "skipped_examples": [f"{i}: {e}" for i, e in failures[:20]],
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------- texts
def encode_tokens(model: Any, tokens: torch.Tensor, device: torch.device | str, *, batch_size: int = 256,
                  autocast: Autocast | None = None, normalize: bool = True, bar: Any = None,
                  keep_dtype: bool = False) -> torch.Tensor:
    """Text embeddings [N, E] on `device`, rows in input order, from length-sorted batches."""
    n = tokens.shape[0]
    if n == 0:
        raise ValueError("encode_tokens: no texts given")
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # argmax = end-token position = pooled position
    out = None
    with no_grad_context(device, autocast):
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            f = model.encode_text(tokens[idx].to(device, non_blocking=True), normalize=normalize)
            f = f if keep_dtype else f.float()
            if out is None:
                out = torch.empty(n, f.shape[1], dtype=f.dtype, device=f.device)
            out[idx.to(f.device)] = f
            if bar is not None:
                bar.update(len(idx))
    return out.clone()  # an ordinary tensor (not an inference tensor) that autograd code may use


def extract_text_features(model: Any, tokenizer: Callable, texts: Sequence[str], device: torch.device | str, *,
                          batch_size: int = 256, chunk: int = 8192, autocast: Autocast | None = None,
                          progress: bool | None = None, desc: str = "texts", normalize: bool = True,
                          keep_dtype: bool = False) -> torch.Tensor:
    """Embeddings [N, E] on the CPU of `texts`, in input order; tokenised `chunk` texts at a time."""
    texts = list(texts)
    out = []
    with progress_bar(len(texts), desc, "text", progress) as bar:
        for start in range(0, len(texts), chunk):
            tokens = tokenizer(texts[start:start + chunk])
            out.append(encode_tokens(model, tokens, device, batch_size=batch_size, autocast=autocast,
                                     normalize=normalize, bar=bar, keep_dtype=keep_dtype).cpu())
    if not out:
        raise ValueError(f"{desc}: no texts given")
    return torch.cat(out)


# ------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "msclip" / "features")


def checkpoint_identity(path: str | None) -> str:
    if path is None:
        return "random-init"
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}"


def cache_key(model_name: str, checkpoint: str | None, dataset: str, split: str, root: str,
              extra: dict | None = None, model_config: dict | None = None) -> str:
    """Hash of (model name and config, checkpoint path + mtime + size, dataset, split, root, extra): a changed
    checkpoint, a config file edited in place or different preprocessing never reuses stale features."""
    ident = {"model": model_name, "checkpoint": checkpoint_identity(checkpoint), "dataset": dataset,
             "split": split, "root": os.path.abspath(root) if root else "", "extra": extra or {}}
    if model_config is not None:
        ident["config"] = model_config
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def cached(cache_dir: str | os.PathLike | None, key: str, compute: Callable[[], dict],
           name: str = "features") -> tuple[dict, bool]:
    """Return (result, hit). Loads `<cache_dir>/<name>-<key>.pt` if present, else computes and stores it
    with msclip.io. `cache_dir=None` disables caching."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("feature cache %s unreadable (%s); recomputing", path, e)
    result = compute()
    mio.torch_save(result, path)
    return result, False
