"""Zero-shot evaluation during training (and the demo's final evaluation), on eval/zeroshot.py's one path.

A recipe's `zeroshot` section picks the images: `kind: folder` (ROOT/<class>/<image>, class names and
templates exactly as `msclip zeroshot --classnames/--templates` take them) or `kind: fashion_mnist` (the
test split). Each call rebuilds the classifier from the model's current text tower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from msclip.errors import MsclipError

from .features import Autocast, SafeDataset
from .imagefolder import folder_dataset, resolve_classnames, scan_image_folder
from .templates import TemplateSet, resolve_templates
from .zeroshot import evaluate_zeroshot

if TYPE_CHECKING:  # annotation only: eval/ does not depend on train/
    from msclip.train.recipe import Recipe

DEFAULT_TEMPLATES = {"folder": "generic", "fashion_mnist": "fashion_mnist"}
REPORT_KEYS = ("top1_pct", "top5_pct", "mean_per_class_recall_pct", "images")


class ArrayImages(Dataset):
    """uint8 images [N, H, W] (or [N, H, W, 3]) + labels as (PIL image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])


@dataclass
class ZeroShotTask:
    dataset: SafeDataset
    classnames: list[str]
    templates: TemplateSet
    names_source: str


def _spread(dataset: Any, num_samples: int | None) -> Any:
    # an evenly spaced subset keeps every class represented (folders and Fashion-MNIST are class-ordered or mixed)
    if num_samples is None or num_samples >= len(dataset):
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, num_samples).round().astype(int).tolist())


def fashion_mnist_task(transform: Callable, num_samples: int | None = None, root: str | None = None,
                       templates: Any = None) -> ZeroShotTask:
    """The Fashion-MNIST test split (the first `num_samples`: classes are balanced throughout the file)."""
    from msclip.data.fashion_mnist import FASHION_MNIST_CAPTION_NAMES, load_fashion_mnist

    images, labels = load_fashion_mnist("test", root=root)
    if num_samples is not None:
        images, labels = images[:num_samples], labels[:num_samples]
    ds = SafeDataset(ArrayImages(np.asarray(images), np.asarray(labels)), transform)
    return ZeroShotTask(ds, list(FASHION_MNIST_CAPTION_NAMES), resolve_templates(templates, "fashion_mnist"),
                        "fashion-mnist")


def folder_task(root: str, transform: Callable, num_samples: int | None = None, classnames: str | None = None,
                templates: Any = None) -> ZeroShotTask:
    """A labelled folder with the class names and templates `msclip zeroshot` would use for it."""
    index = scan_image_folder(root)
    names, source = resolve_classnames(index.classes, classnames)
    ds = folder_dataset(index, transform)
    return ZeroShotTask(_spread(ds, num_samples), names, resolve_templates(templates, "generic"), source)


def recipe_task(recipe: "Recipe", transform: Callable, num_samples: int | None = None) -> ZeroShotTask | None:
    """The task a recipe's `zeroshot` section describes (None when `zeroshot.kind` is null)."""
    z = recipe.zeroshot
    if z.kind is None:
        return None
    if z.kind == "folder":
        if not z.path:
            raise MsclipError("zeroshot.kind=folder needs zeroshot.path (a folder of class sub-folders)")
        return folder_task(z.path, transform, num_samples, z.classnames, z.templates)
    if z.kind == "fashion_mnist":
        return fashion_mnist_task(transform, num_samples, recipe.data.fashion_mnist_root, z.templates)
    raise MsclipError(f"zeroshot.kind={z.kind!r} is not one of null, folder, fashion_mnist")


class ZeroShotEvaluator:
    """Built once; each call puts the model in eval mode, rebuilds the classifier and scores the task."""

    def __init__(self, task: ZeroShotTask, tokenizer: Callable, device: torch.device,
                 autocast: Autocast | None, batch_size: int = 256) -> None:
        self.task, self.tokenizer, self.device, self.autocast = task, tokenizer, device, autocast
        self.batch_size = batch_size

    def full(self, model: nn.Module) -> dict[str, Any]:
        """eval/zeroshot.evaluate_zeroshot's whole result (per-class recall, failures, timing)."""
        was_training = model.training
        model.eval()
        try:
            return evaluate_zeroshot(model, self.tokenizer, self.task.dataset, self.task.classnames,
                                     self.task.templates.templates, self.device, batch_size=self.batch_size,
                                     autocast=self.autocast)
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        result = self.full(model)
        return {k: result[k] for k in REPORT_KEYS}


def build_zeroshot_evaluator(recipe: "Recipe", eval_transform: Callable, tokenizer: Callable,
                             device: torch.device, autocast: Autocast | None
                             ) -> Callable[[nn.Module], dict] | None:
    """The trainer's zero-shot evaluation: None when `recipe.zeroshot.kind` is null, else a callable
    model -> {"top1_pct", "top5_pct", "mean_per_class_recall_pct", "images"}."""
    task = recipe_task(recipe, eval_transform, recipe.zeroshot.num_samples)
    if task is None:
        return None
    return ZeroShotEvaluator(task, tokenizer, device, autocast, recipe.zeroshot.batch_size)
