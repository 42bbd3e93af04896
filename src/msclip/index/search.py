"""Nearest neighbours in an index: text -> image and image -> image, scored by cosine similarity (the inner
product of unit vectors), plus the text -> image recall of the index's own captions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msclip.errors import MissingFileError, MsclipError
from msclip.eval.features import SafeDataset, extract_image_features, extract_text_features
from msclip.eval.imagefolder import ImagePaths
from msclip.eval.loading import eval_transform, file_sha256, load_model

from .store import IndexStore, ModelMismatchError


class QueryError(MsclipError):
    """A query cannot be used (an unreadable query image, no query at all); the message names it."""


@dataclass
class Hit:
    row: int
    score: float  # cosine similarity
    id: str
    captions: list[str]


@dataclass
class QueryResult:
    query: str  # the text, or the query image's path
    kind: str  # "text" | "image"
    hits: list[Hit]


def index_model(store: IndexStore, device: torch.device, pretrained: str | None = None,
                precision: str | None = None) -> Any:
    """The model the index was built with: its spec and weights from meta.json (or `pretrained`, e.g. after
    the weights file moved), refused unless the weights' sha256 is the recorded one."""
    built = store.meta["model"]
    checkpoint = pretrained or built["checkpoint"]
    if not Path(checkpoint).is_file():
        raise MissingFileError(f"index {str(store.path)!r} was built with weights {checkpoint!r}, which do not "
                               "exist any more; pass their new location with --pretrained")
    if file_sha256(checkpoint) != built["checkpoint_sha256"]:
        raise ModelMismatchError(f"weights {checkpoint!r} differ from the ones index {str(store.path)!r} was built "
                                 f"with (sha256 {built['checkpoint_sha256'][:12]}): queries would be embedded by "
                                 "another model")
    return load_model(built["spec"], checkpoint, device, precision or built.get("precision", "fp32"))


def embed_text_queries(model: Any, texts: list[str], device: torch.device) -> np.ndarray:
    import msclip

    emb = extract_text_features(model, msclip.get_tokenizer(model.cfg), texts, device, progress=False,
                                desc="queries")
    return F.normalize(emb.float(), dim=-1).numpy()


def embed_image_queries(model: Any, paths: list[str], device: torch.device) -> np.ndarray:
    """Unit embeddings of query images; an unreadable query image is an error (it was asked for)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f"query image {missing[0]!r} does not exist")
    out = extract_image_features(lambda x: model.encode_image(x, normalize=True),
                                 SafeDataset(ImagePaths(paths), eval_transform(model)), device, progress=False,
                                 desc="query images", allow_empty=True)
    if out["failures"]:
        i, err = out["failures"][0]
        raise QueryError(f"query image {paths[i]!r} cannot be read: {err}")
    return F.normalize(out["features"].float(), dim=-1).numpy()


def search(store: IndexStore, queries: np.ndarray, labels: list[tuple[str, str]], k: int,
           nprobe: int | None = None) -> list[QueryResult]:
    """The k best rows for each query embedding; `labels` = (query, kind) per row of `queries`."""
    scores, rows = store.search(queries, k, nprobe)
    out = []
    for (query, kind), sc, rw in zip(labels, scores, rows):
        hits = [Hit(int(r), float(s), store.items[r].id, store.items[r].captions) for s, r in zip(sc, rw) if r >= 0]
        out.append(QueryResult(query, kind, hits))
    return out


def caption_recall(store: IndexStore, model: Any, device: torch.device, ks: tuple[int, ...] = (1, 5, 10),
                   nprobe: int | None = None) -> dict[str, Any]:
    """Text -> image R@k (percent) of every stored caption against its own image, searched through the index
    (the same definition as `msclip retrieval`; an exact tie may fall either way here)."""
    captions = [(c, r) for r, it in enumerate(store.items) for c in it.captions]
    if not captions:
        raise QueryError(f"index {str(store.path)!r} holds no captions (build it with --captions CSV)")
    emb = embed_text_queries(model, [c for c, _ in captions], device)
    owner = np.array([r for _, r in captions])
    _, rows = store.search(emb, max(ks), nprobe)
    hit_at = (rows == owner[:, None])
    out: dict[str, Any] = {"captions": len(captions), "images": len(store.items)}
    for k in ks:
        out[f"text_to_image_R@{k}_pct"] = 100.0 * float(hit_at[:, :k].any(1).mean())
        out[f"chance_R@{k}_pct"] = 100.0 * min(1.0, k / len(store.items))
    return out
