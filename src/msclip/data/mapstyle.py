"""Map-style sources (CSV/TSV, Fashion-MNIST, synthetic) behind a DistributedSampler.

A corrupt image or a missing / empty / non-UTF-8 caption is skipped and counted, and the batch slot is
filled by the next readable row (index + 1, + 2, ...; counted as ``shortfall``). Batches therefore keep
their full size and every rank runs the same number of steps, which the cross-rank feature gather of the
loss needs (it requires equal shapes; a shrunken batch on one rank would fail or hang the all-gather).
Only the drawn row's own problem is counted, so a bad row is counted once per time the sampler draws it.

The sampler hands the datasets ``(epoch, index)`` keys, and each sample's augmentation is seeded from
``(seed, epoch, index)``: a sample is the same whichever worker loads it and whatever ran before.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from msclip.errors import MissingFileError
from msclip.transforms import UndecodableImage

from .common import (AUGMENT_SALT, DataSpecError, SkipLogger, Tokenizer, Transform, call_seeded, counts_tensor,
                     mix_seed, pin_memory_default, transform_image_file)
from .device_batch import DeviceDecoder, stack_images
from .formats import DataFormatError

MAX_SUBSTITUTIONS = 16  # consecutive unreadable rows tolerated before giving up with an error


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``(epoch, index)`` from a sampler key; a bare index (direct use of a dataset) is epoch 0."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose keys carry the epoch: ``(epoch, index)``. The epoch thus travels with
    each request to the (persistent) workers instead of through shared state."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class CsvCaptions(Dataset):
    """Rows of ``image path, caption`` from a CSV/TSV file with a header line."""

    def __init__(self, path: str, transform: Transform, image_key: str = "filepath",
                 caption_key: str = "title", separator: str | None = None, image_root: str | None = None,
                 seed: int = 0, decode: str = "cpu") -> None:
        file = Path(path)
        if not file.is_file():
            raise MissingFileError(f"CSV/TSV file not found: {path}")
        sep = separator or ("\t" if file.suffix.lower() == ".tsv" else ",")
        # surrogateescape: a non-UTF-8 caption is counted per row (bad_encoding) instead of failing the file,
        # and a non-UTF-8 path still names its file (the os module uses the same escape)
        with open(file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep)
            header = reader.fieldnames or []
            for key, what in ((image_key, "csv_image_key"), (caption_key, "csv_caption_key")):
                if key not in header:
                    raise DataFormatError(f"{path}: column {key!r} ({what}) not found; columns are {header} "
                                     f"(separator {sep!r})")
            rows = [(r[image_key] or "", r[caption_key]) for r in reader]  # caption None: the row lacks it
        if not rows:
            raise DataFormatError(f"{path}: no data rows")
        self.root = Path(image_root) if image_root else file.parent
        self.paths = [p for p, _ in rows]
        self.captions = [c for _, c in rows]
        self.transform = transform
        self.seed, self.decode = seed, decode
        self.source = str(path)
        self._log = SkipLogger()

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int, seed: int) -> tuple[Any, str] | str:
        """The transformed sample (image decoded inside the seeded transform), or the counter to bump."""
        where = f"{self.source} row {index + 2}"
        raw = self.captions[index]
        if raw is None:
            self._log("no caption column in this row", where)
            return "missing_caption"
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:  # a surrogate escape: the file's bytes were not UTF-8
            self._log("caption is not UTF-8", where)
            return "bad_encoding"
        caption = raw.strip()
        if not caption:
            self._log("empty caption", where)
            return "empty_caption"
        path = Path(self.paths[index])
        path = path if path.is_absolute() else self.root / path
        try:
            image = transform_image_file(self.transform, path, seed, plan=self.decode == "gpu")
        except (UndecodableImage, OSError) as exn:  # OSError: a missing file (read before the decoder)
            self._log(f"image not readable ({exn})", str(path))
            return "skipped_decode"
        return image, caption

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, torch.Tensor]:
        epoch, index = split_key(key)
        counts: dict[str, int] = {}
        seed = mix_seed(self.seed, epoch, index, AUGMENT_SALT)
        for step in range(MAX_SUBSTITUTIONS):
            got = self._load((index + step) % len(self), seed)
            if isinstance(got, str):
                if step == 0:  # the substitutes' own problems are counted when they are drawn
                    counts = {got: 1, "shortfall": 1}
                continue
            return got[0], got[1], counts_tensor(counts)
        raise RuntimeError(f"{self.source}: {MAX_SUBSTITUTIONS} consecutive rows from row {index + 2} are "
                           "unreadable or have empty captions; check the image paths / image_root")


_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 220, 40),
           "black": (20, 20, 20), "white": (235, 235, 235), "purple": (140, 50, 170), "orange": (240, 140, 30)}
_SHAPES = ["square", "circle", "triangle", "star"]


class SyntheticCaptions(Dataset):
    """Deterministic noisy colour fields with captions naming the colour (learnable, for tests/benchmarks)."""

    def __init__(self, num_samples: int, transform: Transform, image_size: int = 32, seed: int = 0) -> None:
        self.n, self.transform, self.size, self.seed = num_samples, transform, image_size, seed
        self.colors = list(_COLORS)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, torch.Tensor]:
        epoch, index = split_key(key)
        color = self.colors[index % len(self.colors)]
        shape = _SHAPES[(index // len(self.colors)) % len(_SHAPES)]
        rng = np.random.default_rng(mix_seed(self.seed, index))
        noise = rng.integers(-30, 31, size=(self.size, self.size, 3))
        pixels = np.clip(np.array(_COLORS[color]) + noise, 0, 255).astype(np.uint8)
        caption = f"a photo of a {color} {shape}."
        seed = mix_seed(self.seed, epoch, index, AUGMENT_SALT)
        image = call_seeded(self.transform, Image.fromarray(pixels), seed)
        return image, caption, counts_tensor({})


class Collate:
    """Batch ``(image, caption, counts)`` samples into ``(images, tokens, counts)``; a class so it pickles."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple[torch.Tensor, str, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = stack_images([b[0] for b in batch])
        tokens = self.tokenizer([b[1] for b in batch])
        return images, tokens, torch.stack([b[2] for b in batch]).sum(0)


def map_loader(dataset: Dataset, *, tokenizer: Tokenizer, batch_size: int, workers: int, rank: int,
               world_size: int, seed: int, epoch: int, name: str,
               collate_fn: Callable[[list], Any] | None = None) -> tuple[DataLoader, DistributedSampler, int]:
    """A shuffling loader of full batches; returns ``(loader, sampler, batches per rank)``. ``collate_fn``
    replaces the tokenizing collate for datasets that make whole batches themselves (``__getitems__``)."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    num_batches = len(sampler) // batch_size
    if num_batches < 1:
        raise DataSpecError(f"{name}: {len(dataset)} samples cannot fill one batch of {batch_size} on each of "
                         f"{world_size} rank(s)")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate_fn or Collate(tokenizer), drop_last=True, persistent_workers=workers > 0,
                        pin_memory=pin_memory_default(), generator=loader_generator(seed, rank))
    if getattr(dataset, "decode", "cpu") == "gpu":  # CSV images planned in the workers, decoded here
        return DeviceDecoder(loader, dataset.transform), sampler, num_batches  # type: ignore[attr-defined]
    return loader, sampler, num_batches


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """The DataLoader's own generator: its worker base seeds then never draw from (and so never move) the
    trainer's global RNG, whether or not a resumed process creates the workers at a different epoch."""
    return torch.Generator().manual_seed(mix_seed(seed, rank, 0x10AD))


def csv_dataset(spec: Any, transform: Transform, seed: int = 0) -> CsvCaptions:
    root = spec.image_root
    if root is not None and not os.path.isdir(root):
        raise MissingFileError(f"image_root not found: {root}")
    if spec.decode == "gpu" and not getattr(transform, "decodes_files", False):
        raise DataSpecError(f"{spec.path}: decode=gpu needs msclip's training transform (TrainTransform from "
                            f"create_model_and_transforms), not {type(transform).__name__}")
    return CsvCaptions(spec.path, transform, spec.csv_image_key, spec.csv_caption_key, spec.csv_separator, root,
                       seed=seed, decode=spec.decode)
