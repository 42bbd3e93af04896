"""Image-text retrieval: annotation readers and recall@k as in the CLIP paper, computed in chunks.

Image->text R@k: share of images with at least one of their captions among the k best-scoring captions.
Text->image R@k: share of captions whose image is among the k best-scoring images. Similarities are
computed one chunk of queries at a time, so 25k captions x 5k images never need the full matrix.
Ties count against the query (a competitor scoring exactly as high is ranked ahead).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from msclip.data.formats import wds_captions
from msclip.errors import MissingFileError, MsclipError
from msclip.io import read_user_json, read_user_text

from .features import Autocast, SafeDataset, extract_image_features, extract_text_features
from .loading import eval_transform
from .suite_datasets import find_shards, index_tar_shards, open_image, wds_image


class AnnotationError(MsclipError):
    """An annotation file is unusable; the message names it."""


@dataclass
class RetrievalSet:
    images: list[Any]  # path or TarMember per image
    captions: list[str]
    caption_image: list[int]  # index into `images` of each caption's image
    format: str = ""


# ------------------------------------------------------------------------- readers
def read_karpathy(path: str | os.PathLike, images_root: str | os.PathLike, split: str = "test") -> RetrievalSet:
    """Retrieval JSON: Karpathy-split (dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json: the
    images of `split`), or the BLIP / LAVIS list of {"image", "caption": str or list} records
    (coco_karpathy_test.json, flickr30k_test.json: one split per file, so `split` does not apply)."""
    data = read_user_json(path, "annotations", AnnotationError)
    if isinstance(data, list):
        return _read_record_list(path, data, images_root)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: neither a Karpathy-split file (an object with an 'images' list) nor a "
                              "list of {\"image\", \"caption\"} records (BLIP / LAVIS)")
    images, captions, owner = [], [], []
    for n, rec in enumerate(data["images"]):
        if not isinstance(rec, dict) or not isinstance(rec.get("filename"), str):
            raise AnnotationError(f"{path}: images[{n}] has no 'filename'")
        if split != "all" and rec.get("split") != split:
            continue
        sents = [s.get("raw") or " ".join(s.get("tokens", [])) for s in rec.get("sentences", [])
                 if isinstance(s, dict)]
        sents = [s for s in sents if s.strip()]
        if not sents:
            continue
        images.append(str(Path(images_root) / rec.get("filepath", "") / rec["filename"]))
        for s in sents:
            captions.append(s)
            owner.append(len(images) - 1)
    if not images:
        splits = sorted({str(r.get("split", "?")) for r in data["images"]})
        raise AnnotationError(f"{path}: no image with captions in split {split!r} (splits present: {splits})")
    return RetrievalSet(images, captions, owner, "karpathy")


def _read_record_list(path: str | os.PathLike, data: list, images_root: str | os.PathLike) -> RetrievalSet:
    """BLIP / LAVIS records; several records may name one image (kept once, in first-seen order)."""
    index: dict[str, int] = {}
    images, captions, owner = [], [], []
    for n, rec in enumerate(data):
        caps = rec.get("caption") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or caps is None:
            raise AnnotationError(f"{path}: record [{n}] is not an {{\"image\": ..., \"caption\": ...}} object")
        caps = [c.strip() for c in ([caps] if isinstance(caps, str) else caps) if isinstance(c, str) and c.strip()]
        if not caps:
            continue
        if rec["image"] not in index:
            index[rec["image"]] = len(images)
            images.append(str(Path(images_root) / rec["image"]))
        captions += caps
        owner += [index[rec["image"]]] * len(caps)
    if not images:
        raise AnnotationError(f"{path}: no record with an image and a caption")
    return RetrievalSet(images, captions, owner, "records")


def read_csv_pairs(path: str | os.PathLike, images_root: str | os.PathLike | None = None,
                   image_key: str | None = None, caption_key: str | None = None) -> RetrievalSet:
    """CSV/TSV of (image, caption) rows; several rows may share one image (kept in first-seen order)."""
    path = Path(path)
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    with io.StringIO(read_user_text(path, "annotations", AnnotationError), newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        cols = reader.fieldnames or []
        ik = image_key or next((c for c in ("image", "filepath", "filename", "file", "path") if c in cols), None)
        ck = caption_key or next((c for c in ("caption", "text", "title", "sentence") if c in cols), None)
        if ik not in cols or ck not in cols:
            raise AnnotationError(f"{path}: need image and caption columns (found {cols}); pass the column names")
        root = Path(images_root) if images_root else path.parent
        index: dict[str, int] = {}
        images, captions, owner = [], [], []
        for row in reader:
            p, cap = row[ik], (row[ck] or "").strip()
            if not cap:
                continue
            if p not in index:
                index[p] = len(images)
                images.append(str(root / p))
            captions.append(cap)
            owner.append(index[p])
    if not images:
        raise AnnotationError(f"{path}: no (image, caption) rows")
    return RetrievalSet(images, captions, owner, "csv")


def read_wds_pairs(path: str | os.PathLike) -> RetrievalSet:
    """WebDataset shards (a .tar or a folder of them): image + .txt (one caption per line) or .json."""
    shards = find_shards(path)
    if not shards:
        raise MissingFileError(f"{path}: no .tar shards found")
    images, captions, owner = [], [], []
    for s in index_tar_shards(shards):
        img, caps = wds_image(s), wds_captions(s, one_per_line=True).texts
        if img is None or not caps:
            continue
        images.append(img)
        captions += caps
        owner += [len(images) - 1] * len(caps)
    if not images:
        raise AnnotationError(f"{path}: shards hold no sample with both an image and a caption")
    return RetrievalSet(images, captions, owner, "wds")


def read_annotations(annotations: str, images_root: str | None = None, split: str = "test",
                     image_key: str | None = None, caption_key: str | None = None) -> RetrievalSet:
    p = Path(annotations)
    if not p.exists():
        raise MissingFileError(f"annotations {annotations!r} do not exist")
    if p.is_dir() or p.suffix == ".tar":
        return read_wds_pairs(p)
    if p.suffix.lower() == ".json":
        if images_root is None:
            raise AnnotationError("JSON annotations need --images ROOT")
        return read_karpathy(p, images_root, split)
    return read_csv_pairs(p, images_root, image_key, caption_key)


@dataclass
class RetrievalFeatures:
    """What recall@k was computed from, for a caller's extra output (e.g. a gallery of the worst queries)."""

    images: list[Any]  # the readable images (path or TarMember), row i of image_emb
    captions: list[str]  # the captions kept, row j of text_emb
    caption_image: torch.Tensor  # [T] row in `images` of each caption's image
    image_emb: torch.Tensor  # [I, E] unit rows
    text_emb: torch.Tensor  # [T, E] unit rows


class ImageSource(torch.utils.data.Dataset):
    """Images of a RetrievalSet as (PIL, image index)."""

    def __init__(self, images: list[Any]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return open_image(self.images[i]), i


# ------------------------------------------------------------------------- metrics
def recall_at_k(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k in both directions (fractions). Embeddings should be L2-normalised; [I, E] and [T, E]."""
    caption_image = caption_image.to(image_emb.device).long()
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    # text -> image: rank of the caption's own image among all images
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=image_emb.device)
    for s in range(0, n_txt, chunk):
        sims = text_emb[s:s + chunk] @ image_emb.T  # [c, I]
        own = sims.gather(1, caption_image[s:s + chunk, None])
        t2i_rank[s:s + chunk] = (sims >= own).sum(1) - 1  # 0 = best; ties rank ahead of the query
    # image -> text: rank of the best-scoring caption of the image among all captions
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=image_emb.device)
    for s in range(0, n_img, chunk):
        sims = image_emb[s:s + chunk] @ text_emb.T  # [c, T]
        rows = torch.arange(s, min(s + chunk, n_img), device=sims.device)
        positive = caption_image[None, :] == rows[:, None]
        best_pos = sims.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        i2t_rank[s:s + chunk] = ((sims >= best_pos) & ~positive).sum(1)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item()
    out["image_to_text_mean_rank"] = i2t_rank.float().mean().item() + 1
    out["text_to_image_mean_rank"] = t2i_rank.float().mean().item() + 1
    return out


def evaluate_retrieval(model: Any, data: RetrievalSet, device: torch.device, *, batch_size: int = 64,
                       text_batch_size: int = 256, workers: int = 0, autocast: Autocast | None = None,
                       progress: bool | None = None, chunk: int = 1024,
                       on_features: Callable[[RetrievalFeatures], None] | None = None) -> dict[str, Any]:
    """Recall@1/5/10 in both directions, in percent (`*_R@k_pct`), and the mean ranks. Unreadable images are
    skipped and counted; their captions are dropped with them. `on_features` (optional) receives the
    embeddings the metrics were computed from; it does not change the result."""
    import msclip

    feats = extract_image_features(model.encode_image, SafeDataset(ImageSource(data.images), eval_transform(model)),
                                   device, batch_size=batch_size, workers=workers, autocast=autocast,
                                   progress=progress, desc="images")
    kept = feats["labels"].tolist()  # ImageSource labels are image indices
    new_index = {old: new for new, old in enumerate(kept)}
    caps = [(c, new_index[o]) for c, o in zip(data.captions, data.caption_image) if o in new_index]
    if not caps:
        raise AnnotationError("no caption is left after dropping the captions of unreadable images")
    texts = extract_text_features(model, msclip.get_tokenizer(model.cfg), [c for c, _ in caps], device,
                                  batch_size=text_batch_size, autocast=autocast, progress=progress, desc="captions")
    owner = torch.tensor([o for _, o in caps])
    image_emb, text_emb = F.normalize(feats["features"].to(device), dim=-1), F.normalize(texts.to(device), dim=-1)
    metrics = recall_at_k(image_emb, text_emb, owner, (1, 5, 10), chunk)
    if on_features is not None:
        on_features(RetrievalFeatures([data.images[i] for i in kept], [c for c, _ in caps], owner, image_emb,
                                      text_emb))
    return {"images": len(kept), "captions": len(caps), "skipped_images": feats["skipped"],
            "skipped_examples": feats["skipped_examples"], "dropped_captions": len(data.captions) - len(caps),
            "metrics": {(f"{k}_pct" if "R@" in k else k): (100.0 * v if "R@" in k else v)
                        for k, v in metrics.items()},
            "seconds": feats["seconds"]}
