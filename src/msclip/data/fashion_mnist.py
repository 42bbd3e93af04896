"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX gz files, read with numpy).

Used for the built-in pre-training demo (captions from templates around the class names) and for
zero-shot evaluation on the 10k test images. Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msclip.errors import MissingFileError

from .common import AUGMENT_SALT, DataSpecError, Transform, call_seeded, counts_tensor, mix_seed
from .formats import DataFormatError, read_idx

# Where `apt-get install dataset-fashion-mnist` puts the files (see `dpkg -L dataset-fashion-mnist`).
DEBIAN_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "MSCLIP_FASHION_MNIST_ROOT"  # overrides the default location
INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
                f"fashion_mnist_root / set {ROOT_ENV} to a folder holding the four *-ubyte.gz files")

# Official class names, in label order.
FASHION_MNIST_CLASSNAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Natural lower-case forms used in captions and zero-shot prompts.
FASHION_MNIST_CAPTION_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                               "sandal", "shirt", "sneaker", "bag", "ankle boot"]

# `{}` is the class name, filled by plain `str.format` as zero-shot prompts are (eval/templates.fill_template).
DEFAULT_CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a {}, product photo.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a small picture of a {}.",
    "a {} on a plain background.",
    "an image of a {}.",
    "a catalogue photo of a {}.",
    "a grayscale image of a {}.",
    "a close-up photo of the {}.",
    "a centered photo of a {}.",
    "a {}.",
]

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEBIAN_FASHION_MNIST_ROOT)


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    base = Path(root) if root else default_root()
    return all((base / f).is_file() for pair in _FILES.values() for f in pair)


def _read(path: Path, ndim: int) -> np.ndarray:
    arr = read_idx(path)
    if arr.ndim != ndim:
        raise DataFormatError(f"{path}: expected a {ndim}-d IDX array, found shape {list(arr.shape)}")
    return arr


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])``; N = 60000 (train) or 10000 (test)."""
    if split not in _FILES:
        raise DataSpecError(f"Fashion-MNIST split {split!r} is unknown; expected train or test")
    base = Path(root) if root else default_root()
    img_name, lbl_name = _FILES[split]
    for name in (img_name, lbl_name):
        if not (base / name).is_file():
            raise MissingFileError(f"Fashion-MNIST file {base / name} not found: {INSTALL_HINT}")
    images = _read(base / img_name, 3)
    labels = _read(base / lbl_name, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataFormatError(f"{base}: {len(images)} images but {len(labels)} labels for split {split}")
    return images, labels


class FashionMNISTCaptions(torch.utils.data.Dataset):
    """Map-style pairs: grayscale image -> RGB PIL -> transform; caption from a template chosen per
    (seed, epoch, index), so captions vary between epochs yet replay exactly."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform,
                 templates: list[str] | None = None, seed: int = 0, epoch_value=None) -> None:
        self.images, self.labels = images, labels
        self.transform = transform
        self.templates = list(templates or DEFAULT_CAPTION_TEMPLATES)
        if not self.templates:
            raise DataSpecError("caption_templates must not be empty")
        for t in self.templates:
            if "{}" not in t:
                raise DataSpecError(f"caption template {t!r} has no '{{}}' for the class name")
        self.seed = seed
        self.epoch_value = epoch_value

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int, epoch: int) -> str:
        t = self.templates[mix_seed(self.seed, epoch, index) % len(self.templates)]
        return t.format(FASHION_MNIST_CAPTION_NAMES[int(self.labels[index])])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, torch.Tensor]:
        if isinstance(key, tuple):  # (epoch, index) from the training sampler
            epoch, index = int(key[0]), int(key[1])
        else:
            epoch, index = (self.epoch_value.value if self.epoch_value is not None else 0), int(key)
        image = Image.fromarray(self.images[index]).convert("RGB")
        image = call_seeded(self.transform, image, mix_seed(self.seed, epoch, index, AUGMENT_SALT))
        return image, self.caption(index, epoch), counts_tensor({})

