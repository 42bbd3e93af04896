"""Embedding export: L2-normalised image or text embeddings with the names of their rows, on the shared
feature loops of eval/features.py, written with msclip.io (`.npy` float32 or `.safetensors`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from msclip import io as mio

from .features import SafeDataset, extract_image_features, extract_text_features
from .imagefolder import ImagePaths
from .loading import eval_transform

SUFFIXES = (".npy", ".safetensors")


def sidecar_path(output: str) -> str:
    """OUT.npy -> OUT.json: the row names, skipped images and model of an embedding file."""
    return str(Path(output).with_suffix(".json"))


def embed_images(model: Any, paths: list[str], device: torch.device, batch_size: int = 64, workers: int = 0,
                 progress: bool | None = None) -> tuple[torch.Tensor, list[int], list[dict]]:
    """-> (embeddings of the loadable images in the model's dtype, their indices into `paths`,
    skipped [{path, error}])."""
    out = extract_image_features(lambda x: model.encode_image(x, normalize=True),
                                 SafeDataset(ImagePaths(paths), eval_transform(model)), device,
                                 batch_size=batch_size, workers=workers, progress=progress, desc="embed images",
                                 keep_dtype=True, allow_empty=True)
    skipped = [{"path": paths[i], "error": err} for i, err in out["failures"]]
    emb = out["features"] if len(out["indices"]) else torch.empty(0, model.cfg.embed_dim, dtype=_dtype(model))
    return emb, out["indices"].tolist(), skipped


def embed_texts(model: Any, texts: list[str], device: torch.device, batch_size: int = 64,
                progress: bool | None = None) -> torch.Tensor:
    """Embeddings in input order, in the model's dtype (length-sorted batches, see eval/features.py)."""
    import msclip

    return extract_text_features(model, msclip.get_tokenizer(model.cfg), texts, device, batch_size=batch_size,
                                 progress=progress, desc="embed texts", keep_dtype=True)


def _dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def write_embeddings(emb: torch.Tensor, path: str, metadata: dict[str, str], sidecar: dict | None = None) -> None:
    """`.npy` (always float32: numpy has no bfloat16) or `.safetensors` (tensor "embeddings", as computed); with
    `sidecar`, its JSON too (row names, model; ``sidecar_path``). The two are written together
    (``mio.atomic_write_many``): a failed write leaves the earlier pair, whose row i is still names[i].
    Temporaries that a killed run left for these two files are removed first."""
    if path.endswith(".npy"):
        write = mio.numpy_writer(emb.float().numpy())
    else:
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            save_file({"embeddings": emb.contiguous()}, tmp, metadata=metadata)
    writes: list = [(path, write)]
    if sidecar is not None:
        writes.append((sidecar_path(path), mio.json_writer(sidecar)))
    mio.remove_stale_temporaries(Path(path).parent, [Path(p).name for p, _ in writes])
    mio.atomic_write_many(writes)
