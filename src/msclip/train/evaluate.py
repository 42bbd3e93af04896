"""Zero-shot classification with prompt ensembling, used during training and by the demo.

Classifier: for each class, every template's text embedding is L2-normalised, averaged and re-normalised;
logits = image_features @ W; top-1 / top-5 and mean per-class recall.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def fill_template(template: str, classname: str) -> str:
    """``template.format(classname)`` with "a" -> "an" before a vowel ("an ankle boot")."""
    from msclip.data.fashion_mnist import render_caption

    return render_caption(template, classname)


@torch.no_grad()
def build_classifier(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """[embed_dim, num_classes] matrix of prompt-ensembled, normalised class embeddings (fp32)."""
    columns = []
    for name in classnames:
        tokens = tokenizer([fill_template(t, name) for t in templates]).to(device)
        with autocast():
            emb = model.encode_text(tokens, normalize=True).float()
        columns.append(nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def evaluate_zeroshot(model: nn.Module, classifier: torch.Tensor, loader: DataLoader, device: torch.device,
                      autocast: Callable[[], ContextManager], per_class: bool = False) -> dict[str, Any]:
    num_classes = classifier.shape[1]
    correct1 = correct5 = total = 0
    per_class_hit = torch.zeros(num_classes)
    per_class_n = torch.zeros(num_classes)
    for images, labels in loader:
        with autocast():
            feats = model.encode_image(images.to(device), normalize=True).float()
        logits = feats @ classifier
        top = logits.topk(min(5, num_classes), dim=-1).indices.cpu()
        hit1 = top[:, 0] == labels
        correct1 += int(hit1.sum())
        correct5 += int((top == labels[:, None]).any(dim=-1).sum())
        total += len(labels)
        per_class_n += torch.bincount(labels, minlength=num_classes).float()
        per_class_hit += torch.bincount(labels[hit1], minlength=num_classes).float()
    recalls = per_class_hit / per_class_n.clamp(min=1)
    out: dict[str, Any] = {"top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1),
                           "mean_per_class_recall": float(recalls[per_class_n > 0].mean()), "num_images": total}
    if per_class:
        out["per_class"] = recalls.tolist()
    return out


class ArrayImages(Dataset):
    """uint8 images [N, H, W] (or [N, H, W, 3]) + labels, through a PIL transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


def fashion_mnist_eval_set(transform: Callable, num_samples: int | None = None, root: str | None = None,
                           split: str = "test") -> tuple[Dataset, list[str]]:
    """The Fashion-MNIST test split (first ``num_samples``: classes are balanced throughout the file)."""
    from msclip.data.fashion_mnist import FASHION_MNIST_CAPTION_NAMES, load_fashion_mnist

    images, labels = load_fashion_mnist(split, root=root)
    if num_samples is not None:
        images, labels = images[:num_samples], labels[:num_samples]
    return ArrayImages(np.asarray(images), np.asarray(labels), transform), list(FASHION_MNIST_CAPTION_NAMES)


def folder_eval_set(root: str | Path, transform: Callable,
                    num_samples: int | None = None) -> tuple[Dataset, list[str]]:
    """A labelled folder (one sub-folder per class; ``ankle_boot`` -> "ankle boot")."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), transform=transform)
    if len(ds) == 0:
        raise ValueError(f"zero-shot folder {root} holds no images")
    classnames = [c.replace("_", " ") for c in ds.classes]
    if num_samples is not None and num_samples < len(ds):
        # an evenly spaced subset keeps every class represented (ImageFolder sorts by class)
        idx = np.linspace(0, len(ds) - 1, num_samples).round().astype(int).tolist()
        ds = torch.utils.data.Subset(ds, idx)
    return ds, classnames


class ZeroShotEvaluator:
    """Builds the eval set once; each call rebuilds the classifier from the current text tower."""

    def __init__(self, dataset: Dataset, classnames: Sequence[str], templates: Sequence[str],
                 tokenizer: Callable, device: torch.device, autocast: Callable[[], ContextManager],
                 batch_size: int = 256, per_class: bool = False) -> None:
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        self.classnames, self.templates = list(classnames), list(templates)
        self.tokenizer, self.device, self.autocast = tokenizer, device, autocast
        self.per_class = per_class

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            clf = build_classifier(model, self.tokenizer, self.classnames, self.templates, self.device,
                                   self.autocast)
            return evaluate_zeroshot(model, clf, self.loader, self.device, self.autocast, self.per_class)
        finally:
            model.train(was_training)
