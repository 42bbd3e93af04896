"""Zero-shot classification: classifier weights, scoring and metrics.

The procedure is the official MS-CLIP one (spec section 11): for each class, every template's text
embedding is L2-normalised, the class weight is their mean, renormalised; logits = 100 * f_img . W
with L2-normalised image features (a fixed 100, not the learned logit scale).

Speed: texts of many classes go through the text tower together, sorted by length so that each
batch is cut to its longest caption by `encode_text` (exact under the causal mask + EOT pooling);
tokenisation can run in DataLoader workers; everything runs under `torch.inference_mode`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Callable, Sequence

import functools

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .imagefolder import Batch

ZS_LOGIT_SCALE = 100.0


def _inference(fn: Callable) -> Callable:
    """Run `fn` under torch.inference_mode but hand back an ordinary tensor (a cheap clone made
    outside the mode), so callers may still use the result in autograd-tracked code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return out.clone()
    return wrapper


def _progress(total: int, desc: str, unit: str, enabled: bool | None):
    from tqdm import tqdm
    # enabled=None: tqdm decides (shown on a terminal, hidden when stderr is a pipe/file).
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, mininterval=1.0, smoothing=0.1)


@_inference
def encode_texts(model, tokens: torch.Tensor, device: torch.device | str, batch_size: int = 256,
                 bar=None) -> torch.Tensor:
    """L2-normalised text embeddings [N, E] (float32, on `device`), rows in input order.

    Batches are formed from length-sorted texts, so each batch is as short as its longest member."""
    n = tokens.shape[0]
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # argmax = EOT position = pooled position
    out = None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        feats = model.encode_text(tokens[idx].to(device, non_blocking=True), normalize=True).float()
        if out is None:
            out = torch.empty(n, feats.shape[1], dtype=torch.float32, device=feats.device)
        out[idx.to(feats.device)] = feats
        if bar is not None:
            bar.update(len(idx))
    if out is None:
        raise ValueError("encode_texts: no texts given")
    return out


def class_weights_from_features(feats: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C*T, E] normalised template embeddings (class-major) -> [E, C] classifier (official math)."""
    per_class = feats.reshape(num_classes, -1, feats.shape[-1]).mean(dim=1)
    return F.normalize(per_class, dim=-1).t().contiguous()


@_inference
def classifier_from_tokens(model, tokens: torch.Tensor, num_classes: int, device: torch.device | str,
                           batch_size: int = 256) -> torch.Tensor:
    """Classifier [E, C] from already tokenised prompts, class-major (row c*T + t)."""
    if tokens.shape[0] % num_classes:
        raise ValueError(f"{tokens.shape[0]} prompts are not a multiple of {num_classes} classes")
    return class_weights_from_features(encode_texts(model, tokens, device, batch_size), num_classes)


class _PromptChunks(Dataset):
    """Chunk k = the tokenised prompts (class-major) of a contiguous range of classes."""

    def __init__(self, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                 classes_per_chunk: int):
        self.tokenizer, self.classnames, self.templates = tokenizer, list(classnames), list(templates)
        self.per = classes_per_chunk

    def __len__(self) -> int:
        return math.ceil(len(self.classnames) / self.per)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor]:
        names = self.classnames[k * self.per:(k + 1) * self.per]
        texts = [t.format(c) for c in names for t in self.templates]
        return k * self.per, self.tokenizer(texts)


@_inference
def build_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str = "cpu", text_batch_size: int = 256,
                     texts_per_chunk: int = 4096, workers: int = 0, progress: bool | None = False
                     ) -> torch.Tensor:
    """Zero-shot classifier W [E, C] (float32, on `device`) from class names and format templates.

    Prompts are tokenised and encoded a chunk of classes at a time (bounded memory); with `workers`
    > 0, DataLoader workers tokenise the next chunks while the model encodes the current one."""
    if not classnames:
        raise ValueError("build_classifier: no class names")
    if not templates:
        raise ValueError("build_classifier: no templates")
    n_t = len(templates)
    chunks = _PromptChunks(tokenizer, classnames, templates, max(1, texts_per_chunk // n_t))
    loader: object = (DataLoader(chunks, batch_size=None, num_workers=workers)
                      if workers > 0 and len(chunks) > 1 else (chunks[k] for k in range(len(chunks))))
    W = None
    with _progress(len(classnames) * n_t, "class embeddings", "text", progress) as bar:
        for start, tokens in loader:
            n_c = tokens.shape[0] // n_t
            w = class_weights_from_features(encode_texts(model, tokens, device, text_batch_size, bar), n_c)
            if W is None:
                W = torch.empty(w.shape[0], len(classnames), dtype=torch.float32, device=w.device)
            W[:, start:start + n_c] = w
    return W


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """100 * f . W for L2-normalised image features [B, E] and classifier [E, C]."""
    return ZS_LOGIT_SCALE * image_features.float() @ classifier


class ZeroShotMetrics:
    """Streaming top-1 / top-5 accuracy, mean per-class recall and per-class accuracy (percent)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.k5 = min(5, num_classes)
        self.count = torch.zeros(num_classes, dtype=torch.long)
        self.correct1 = torch.zeros(num_classes, dtype=torch.long)
        self.correct5 = torch.zeros(num_classes, dtype=torch.long)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        top = logits.topk(self.k5, dim=-1).indices
        hit = top == labels[:, None]
        self.count += torch.bincount(labels, minlength=self.num_classes)
        self.correct1 += torch.bincount(labels[hit[:, 0]], minlength=self.num_classes)
        self.correct5 += torch.bincount(labels[hit.any(dim=-1)], minlength=self.num_classes)

    def compute(self, class_folders: Sequence[str] | None = None,
                classnames: Sequence[str] | None = None) -> dict:
        n = int(self.count.sum())
        seen = self.count > 0
        recall = self.correct1[seen].double() / self.count[seen].double()
        per_class = []
        for c in range(self.num_classes):
            cnt = int(self.count[c])
            entry = {"index": c, "images": cnt, "correct": int(self.correct1[c]),
                     "accuracy": 100.0 * int(self.correct1[c]) / cnt if cnt else None}
            if class_folders is not None:
                entry["folder"] = class_folders[c]
            if classnames is not None:
                entry["name"] = classnames[c]
            per_class.append(entry)
        return {
            "top1": 100.0 * int(self.correct1.sum()) / n if n else None,
            "top5": 100.0 * int(self.correct5.sum()) / n if n else None,
            "top5_k": self.k5,  # < 5 only when there are fewer than 5 classes
            "mean_per_class_recall": 100.0 * float(recall.mean()) if n else None,
            "images_scored": n,
            "per_class": per_class,
        }


@torch.inference_mode()
def evaluate_loader(model, classifier: torch.Tensor, loader, device: torch.device | str, num_classes: int,
                    paths: Sequence[str], progress: bool | None = False) -> dict:
    """Score every loadable image of `loader` (yielding imagefolder.Batch). Returns the metric
    accumulator plus the skipped images [{path, error}], image seconds and images/s."""
    metrics = ZeroShotMetrics(num_classes)
    skipped: list[dict] = []
    t0 = time.perf_counter()
    batch: Batch
    with _progress(len(paths), "zero-shot", "img", progress) as bar:
        for batch in loader:
            for idx, err in batch.failures:
                skipped.append({"path": paths[idx], "error": err})
            if batch.images is not None:
                f = model.encode_image(batch.images.to(device, non_blocking=True), normalize=True)
                metrics.update(zeroshot_logits(f, classifier), batch.labels)
            bar.update(len(batch.labels) + len(batch.failures))
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = int(metrics.count.sum())
    return {"metrics": metrics, "skipped": skipped, "seconds": seconds,
            "images_per_second": n / seconds if seconds > 0 else None}


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    """Write JSON via a temp file in the same folder + os.replace, so readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
