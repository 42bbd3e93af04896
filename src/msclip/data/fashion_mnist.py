"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX gz files, read with numpy).

Used for the built-in pre-training demo (captions from templates around the class names) and for
zero-shot evaluation on the 10k test images. Nothing is downloaded.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msclip.errors import MissingFileError

from .common import AUGMENT_SALT, DataSpecError, Tokenizer, Transform, call_seeded, counts_tensor, mix_seed
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
    bad = np.flatnonzero(labels >= len(FASHION_MNIST_CLASSNAMES))  # uint8: never negative
    if bad.size:
        raise DataFormatError(f"{base / lbl_name}: label {int(labels[bad[0]])} at index {int(bad[0])} is not one of "
                              f"the {len(FASHION_MNIST_CLASSNAMES)} classes ({bad.size} such labels)")
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



# --- the batch path: whole batches as tensors -----------------------------------------------------------------
# The per-image path above costs ~0.1 ms of Python and PIL per image (convert, seeded crop, resize, ToTensor,
# Normalize, tokenise). The batch path below makes the same kind of samples for a whole batch at once: crop
# boxes drawn vectorised from per-sample hashes of (seed, epoch, index), crop + resize as two batched matrix
# products with PIL's own resampling weights, captions looked up in a table tokenised once, images kept uint8
# (the trainer normalises them on the device, data/device_batch.py).

_U64 = np.uint64
_GOLDEN, _MIX = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback


def mix_seed_array(*parts: int | np.ndarray) -> np.ndarray:
    """``common.mix_seed`` on (broadcast) arrays of non-negative ints: element for element the same values."""
    arrs = [np.asarray(p).astype(_U64) for p in parts]
    h = np.full(np.broadcast_shapes(*(a.shape for a in arrs)), _GOLDEN, dtype=_U64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, as the masked Python ints do
        for p in arrs:
            h = h ^ (p + _GOLDEN + (h << _U64(6)) + (h >> _U64(2)))
            h = h * _MIX
            h ^= h >> _U64(31)
    return h & _U64(0x7FFFFFFFFFFFFFFF)


def _uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """``[len(seeds), n]`` floats in [0, 1): draw k of sample b is splitmix64's k-th output from seeds[b] (a
    full-avalanche finaliser: ``mix_seed`` of consecutive ints alone gives correlated draws, measured)."""
    with np.errstate(over="ignore"):
        z = seeds.astype(_U64)[:, None] + (np.arange(1, n + 1, dtype=_U64) * _GOLDEN)[None]
        z = (z ^ (z >> _U64(30))) * _MIX
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        z ^= z >> _U64(31)
    return (z >> _U64(11)).astype(np.float64) * 2.0 ** -53  # the top 53 bits


def random_resized_crop_boxes(seeds: np.ndarray, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float]) -> np.ndarray:
    """``[B, 4]`` int64 boxes (top, left, h, w): torchvision ``RandomResizedCrop.get_params``'s algorithm
    (area and log-aspect uniform, 10 tries, then the centre-crop fallback), one sample per seed, vectorised."""
    u = _uniforms(seeds, 4 * _CROP_ATTEMPTS).reshape(len(seeds), _CROP_ATTEMPTS, 4)
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, as Python's round()
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = np.floor(u[..., 2] * (height - h + 1)).astype(np.int64)  # randint(0, height - h + 1)
    left = np.floor(u[..., 3] * (width - w + 1)).astype(np.int64)
    first = ok.argmax(axis=1)  # the first accepted try
    rows = np.arange(len(seeds))
    boxes = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], axis=1)
    # fallback: centre crop at the nearest allowed aspect ratio
    in_ratio = width / height
    fw, fh = width, height
    if in_ratio < min(ratio):
        fh = int(round(fw / min(ratio)))
    elif in_ratio > max(ratio):
        fw = int(round(fh * max(ratio)))
    boxes[~ok.any(axis=1)] = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return boxes


def _bicubic(x: torch.Tensor) -> torch.Tensor:  # PIL's bicubic filter (a = -0.5), support 2
    a, x = -0.5, x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:  # PIL's triangle filter, support 1
    return (1.0 - x.abs()).clamp(min=0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def resample_matrices(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                      interpolation: str) -> torch.Tensor:
    """``[B, out_size, in_size]``: row o holds the weights PIL's resampler gives the input pixels for output
    pixel o when the window ``[start, start + length)`` of an axis is resized to ``out_size`` (antialiased when
    shrinking; the kernel is cut at the window's edges and renormalised, as PIL does after a crop)."""
    kernel, support = _FILTERS[interpolation]
    start, length = start.double(), length.double()
    scale = length / out_size
    fscale = scale.clamp(min=1.0)
    sup = support * fscale
    center = (torch.arange(out_size, dtype=torch.float64)[None] + 0.5) * scale[:, None]  # [B, out]
    xmin = torch.trunc(center - sup[:, None] + 0.5).clamp(min=0.0)  # C's (int) cast, as in PIL
    count = torch.minimum(torch.trunc(center + sup[:, None] + 0.5), length[:, None]) - xmin
    taps = torch.arange(int(math.ceil(float(sup.max()))) * 2 + 1, dtype=torch.float64)
    x = xmin[..., None] + taps  # [B, out, K] positions inside the window
    w = kernel((x - center[..., None] + 0.5) / fscale[:, None, None]) * (taps < count[..., None])
    w = w / w.sum(-1, keepdim=True).where(w.sum(-1, keepdim=True) != 0, torch.ones(()))
    cols = (start[:, None, None] + x).clamp(max=in_size - 1).long()
    return torch.zeros(len(start), out_size, in_size, dtype=torch.float64).scatter_add_(2, cols, w).float()


def resample_table(in_size: int, out_size: int, interpolation: str) -> torch.Tensor:
    """``[in_size, in_size + 1, out_size, in_size]``: ``resample_matrices`` for every window (start, length)
    of an axis (invalid windows are zeros), so a batch's matrices are one gather."""
    start, length = torch.meshgrid(torch.arange(in_size), torch.arange(in_size + 1), indexing="ij")
    valid = ((start + length <= in_size) & (length > 0)).flatten()
    table = torch.zeros(in_size * (in_size + 1), out_size, in_size)
    table[valid] = resample_matrices(start.flatten()[valid], length.flatten()[valid], in_size, out_size,
                                     interpolation)
    return table.view(in_size, in_size + 1, out_size, in_size)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str,
                  tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Crop ``boxes`` (top, left, h, w) out of uint8 ``images [B, H, W]`` and resize each to ``size x size``:
    PIL's two passes (horizontal, then vertical, each rounded to uint8) as two batched matrix products.
    ``tables``: ``resample_table`` of the height and the width axis, if precomputed."""
    _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    if tables is None:
        mx = resample_matrices(left, w, width, size, interpolation)
        my = resample_matrices(top, h, height, size, interpolation)
    else:
        my, mx = tables[0][top, h], tables[1][left, w]
    rows = torch.bmm(images.float(), mx.transpose(1, 2)).add_(0.5).floor_().clamp_(0, 255)
    return torch.bmm(my, rows).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)


def batch_crop_spec(transform: Transform) -> dict | None:
    """The crop of ``transform`` when it is msclip's training transform (``msclip.transforms.TrainTransform``:
    a RandomResizedCrop to a square, then normalised), which the batch path reproduces; None otherwise (any
    other transform keeps the per-image path)."""
    names = ("size", "scale", "ratio", "interpolation", "mean", "std")
    if not getattr(transform, "decodes_files", False) or not all(hasattr(transform, n) for n in names):
        return None
    if transform.interpolation not in _FILTERS:  # type: ignore[attr-defined]
        return None
    spec = {n: getattr(transform, n) for n in names}
    return {**spec, "size": int(spec["size"]), "scale": tuple(map(float, spec["scale"])),
            "ratio": tuple(map(float, spec["ratio"])), "mean": tuple(spec["mean"]), "std": tuple(spec["std"])}


class FashionMNISTBatches(torch.utils.data.Dataset):
    """The pairs of ``FashionMNISTCaptions`` made a batch at a time (``__getitems__``, which the DataLoader
    calls with a batch's keys): ``(images uint8 [B, 3, S, S], tokens [B, T], counts)``.

    Same captions, key for key (the same template draw); crops from the same distribution as the per-image
    path's RandomResizedCrop and resized with PIL's weights (within 1 grey level of PIL, a rounding detail);
    every sample a pure function of ``(seed, epoch, index)``, so batches replay exactly whatever loads them.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, crop: dict, tokenizer: Tokenizer,
                 templates: list[str] | None = None, seed: int = 0) -> None:
        self.captions = FashionMNISTCaptions(images, labels, lambda im: im, templates, seed)  # validation, captions
        self.images = torch.tensor(images, dtype=torch.uint8)  # a copy: the IDX arrays are read-only
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.crop, self.seed = crop, seed
        n_cls = len(FASHION_MNIST_CAPTION_NAMES)
        texts = [t.format(name) for t in self.captions.templates for name in FASHION_MNIST_CAPTION_NAMES]
        self.token_table = tokenizer(texts)  # every caption there is, tokenised once: row template * 10 + label
        self.n_cls = n_cls
        _, height, width = self.images.shape
        table_y = resample_table(height, crop["size"], crop["interpolation"])  # once: the matrices of every crop
        table_x = table_y if width == height else resample_table(width, crop["size"], crop["interpolation"])
        self.tables = (table_y, table_x)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = np.asarray(keys, dtype=np.int64)  # (epoch, index) sampler keys, or bare indices (epoch 0)
        epoch, index = (k[:, 0], k[:, 1]) if k.ndim == 2 else (np.zeros_like(k), k)
        c = self.crop
        seeds = mix_seed_array(self.seed, epoch, index, AUGMENT_SALT)
        boxes = random_resized_crop_boxes(seeds, self.images.shape[1], self.images.shape[2], c["scale"], c["ratio"])
        idx = torch.from_numpy(index)
        gray = resized_crops(self.images[idx], torch.from_numpy(boxes), c["size"], c["interpolation"], self.tables)
        template = mix_seed_array(self.seed, epoch, index) % _U64(len(self.captions.templates))
        rows = torch.from_numpy(template.astype(np.int64)) * self.n_cls + self.labels[idx]
        images = gray[:, None].expand(-1, 3, -1, -1).contiguous()  # grey -> RGB: three equal channels
        return images, self.token_table[rows], counts_tensor({})


def whole_batch(batch: tuple) -> tuple:
    """The DataLoader's collate for ``__getitems__`` datasets: the batch is already made."""
    return batch
