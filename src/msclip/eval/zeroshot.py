"""Zero-shot classification: the one classifier builder, the one scoring loop and the one metric function,
used by `msclip zeroshot`, tools/eval_zeroshot.py, the trainer's in-training evaluation and the demo.

The classifier is the official MS-CLIP one: for each class, every template's text embedding is
L2-normalised, the class weight is their mean, renormalised; logits = 100 * f_img . W with L2-normalised
image features (a fixed 100, not the learned logit scale). Prompts are filled by
`templates.fill_template`. Reports are in percent, with the unit in every key (`top1_pct`, ...).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import metrics as M
from .features import Autocast, SafeDataset, encode_tokens, extract_image_features, progress_bar
from .templates import fill_template

ZS_LOGIT_SCALE = 100.0
PROCEDURE = ("per-template L2-normalised text embeddings, mean per class, renormalised; "
             "logits = 100 * normalised image features @ W")


def class_weights_from_features(feats: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C*T, E] normalised template embeddings (class-major) -> [E, C] classifier (official math)."""
    per_class = feats.reshape(num_classes, -1, feats.shape[-1]).mean(dim=1)
    return F.normalize(per_class, dim=-1).t().contiguous()


def classifier_from_tokens(model: Any, tokens: torch.Tensor, num_classes: int, device: torch.device | str,
                           batch_size: int = 256, autocast: Autocast | None = None) -> torch.Tensor:
    """Classifier [E, C] from already tokenised prompts, class-major (row c*T + t)."""
    if tokens.shape[0] % num_classes:
        raise ValueError(f"{tokens.shape[0]} prompts are not a multiple of {num_classes} classes")
    feats = encode_tokens(model, tokens, device, batch_size=batch_size, autocast=autocast)
    return class_weights_from_features(feats, num_classes)


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
        return k * self.per, self.tokenizer([fill_template(t, c) for c in names for t in self.templates])


def build_classifier(model: Any, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str = "cpu", *, text_batch_size: int = 256, texts_per_chunk: int = 4096,
                     workers: int = 0, autocast: Autocast | None = None, progress: bool | None = False
                     ) -> torch.Tensor:
    """Zero-shot classifier W [E, C] (float32, on `device`) from class names and format templates.

    Prompts are tokenised and encoded a chunk of classes at a time (bounded memory); with `workers` > 0,
    DataLoader workers tokenise the next chunks while the model encodes the current one."""
    if not classnames:
        raise ValueError("build_classifier: no class names")
    if not templates:
        raise ValueError("build_classifier: no templates")
    n_t = len(templates)
    chunks = _PromptChunks(tokenizer, classnames, templates, max(1, texts_per_chunk // n_t))
    loader: Any = (DataLoader(chunks, batch_size=None, num_workers=workers)
                   if workers > 0 and len(chunks) > 1 else (chunks[k] for k in range(len(chunks))))
    W = None
    with progress_bar(len(classnames) * n_t, "class embeddings", "text", progress) as bar:
        for start, tokens in loader:
            n_c = tokens.shape[0] // n_t
            feats = encode_tokens(model, tokens, device, batch_size=text_batch_size, autocast=autocast, bar=bar)
            w = class_weights_from_features(feats, n_c)
            if W is None:
                W = torch.empty(w.shape[0], len(classnames), dtype=torch.float32, device=w.device)
            W[:, start:start + n_c] = w
    return W


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """100 * f . W for L2-normalised image features [B, E] and classifier [E, C]."""
    return ZS_LOGIT_SCALE * image_features.float() @ classifier.to(image_features.device)


def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1, top-5 (top-k, k = min(5, classes)), mean per-class recall and per-class recall, in percent."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    n = len(labels)
    if n == 0:
        raise ValueError("zeroshot_metrics: no image was scored")
    k5 = min(5, num_classes)
    top = M.topk_accuracy(logits, labels, (1, k5))
    support, correct = M.per_class_counts(logits, labels, num_classes)
    return {"top1_pct": 100.0 * top[1], "top5_pct": 100.0 * top[k5], "top5_k": k5,
            "mean_per_class_recall_pct": 100.0 * M.mean_per_class_recall(logits, labels, num_classes),
            "images": n,
            "per_class": [{"index": c, "images": int(support[c]), "correct": int(correct[c]),
                           "recall_pct": 100.0 * int(correct[c]) / int(support[c]) if support[c] else None}
                          for c in range(num_classes)]}


def score_images(model: Any, classifier: torch.Tensor, dataset: SafeDataset, device: torch.device | str, *,
                 batch_size: int = 64, workers: int = 0, autocast: Autocast | None = None,
                 progress: bool | None = False) -> dict[str, Any]:
    """zeroshot_metrics of every loadable image of `dataset`, plus "failures" [(index, error)] and "seconds"."""
    out = extract_image_features(lambda x: model.encode_image(x, normalize=True), dataset, device,
                                 batch_size=batch_size, workers=workers, autocast=autocast, progress=progress,
                                 desc="zero-shot")
    result = zeroshot_metrics(zeroshot_logits(out["features"], classifier.cpu()), out["labels"],
                              classifier.shape[1])
    result.update(failures=out["failures"], seconds=out["seconds"])
    return result


def evaluate_zeroshot(model: Any, tokenizer: Callable, dataset: SafeDataset, classnames: Sequence[str],
                      templates: Sequence[str], device: torch.device | str, *, batch_size: int = 64,
                      text_batch_size: int = 256, workers: int = 0, autocast: Autocast | None = None,
                      progress: bool | None = False) -> dict[str, Any]:
    """The one zero-shot path: classifier from the current text tower, then every image scored.

    Returns zeroshot_metrics' dict plus "failures", "seconds" (images) and "class_embedding_seconds"."""
    import time

    t0 = time.perf_counter()
    classifier = build_classifier(model, tokenizer, classnames, templates, device, text_batch_size=text_batch_size,
                                  workers=workers, autocast=autocast, progress=progress)
    t_cls = time.perf_counter() - t0
    result = score_images(model, classifier, dataset, device, batch_size=batch_size, workers=workers,
                          autocast=autocast, progress=progress)
    result["class_embedding_seconds"] = t_cls
    return result
