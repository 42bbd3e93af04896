"""Shared pieces of the training data sources: the spec (also the recipe's ``data`` section), the result,
skip accounting and per-sample seeding.

Skip counts are produced inside DataLoader worker processes, so they cannot live in a shared Python
object. Every batch carries a small ``counts`` tensor (skips since the previous batch of that worker);
``CountingLoader`` strips it in the main process and adds it to ``DataStats``. Nothing is lost when a
worker process exits, nothing needs locks, and each count reaches the stats exactly once.

Exact resume: every sample's content (order, caption choice, augmentation) is a pure function of
``(seed, epoch, position)``. Augmentations run under ``call_seeded``, which seeds torch's CPU generator
and
Python's ``random`` from that tuple and restores them afterwards, so neither the worker processes' RNG
history (persistent workers live across epochs) nor the trainer's RNG matters, and loading data never
changes the trainer's RNG.
"""
from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image

from msclip.errors import MsclipError
from msclip.transforms import UndecodableImage, to_rgb

log = logging.getLogger(__name__)

# Order of the entries of the per-batch counts tensor; each sample or shard problem lands in exactly one.
COUNT_FIELDS = (
    "skipped_decode",  # sample skipped: image missing or undecodable
    "missing_caption",  # sample skipped: no caption (no .txt/.json, no caption field, CSV row without it)
    "empty_caption",  # sample skipped: caption blank after stripping
    "bad_encoding",  # sample skipped: caption not UTF-8 (or its .json not parseable)
    "read_errors",  # a shard that could not be opened or read; the rest of it is skipped (named in the log)
    "truncated_shards",  # a shard that ends early (cut tar); its readable samples are used (named in the log)
    "dropped_partial",  # samples of an epoch left out because they do not fill a last full batch
    "shortfall",  # samples delivered twice to make up for missing ones (a re-read shard, a substituted row)
)
SAMPLE_SKIPS = COUNT_FIELDS[:4]  # the per-sample skip categories
KINDS = ("webdataset", "csv", "fashion_mnist", "synthetic")
DECODE_PLACES = ("cpu", "gpu")

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Any], torch.Tensor]


class DataSpecError(MsclipError):
    """A data spec value is unusable; the message names the field and the value."""


@dataclass
class DataSpec:
    """Where the training pairs come from and how they are batched: the recipe's ``data`` section.

    ``batch_size`` and ``workers`` are defaults for ``build_train_data`` (its keyword arguments win).
    """

    kind: str = "synthetic"  # webdataset | csv | fashion_mnist | synthetic
    path: str | None = None  # shards (brace pattern, pipe:, '::'-joined) or the csv/tsv file
    # webdataset: samples per epoch (null = counted from local shards; required when resampled or remote);
    # synthetic: the data set size (null = 512)
    num_samples: int | None = None
    resampled: bool = False  # webdataset: draw shards with replacement ("virtual epochs")
    csv_image_key: str = "filepath"  # csv: column with the image path
    csv_caption_key: str = "title"  # csv: column with the caption
    csv_separator: str | None = None  # csv: null = tab for .tsv, comma otherwise
    image_root: str | None = None  # base directory for relative csv image paths (default: the csv's)
    caption_templates: list[str] | None = None  # fashion_mnist: caption templates with `{}`; null = the 12 built-in
    fashion_mnist_root: str | None = None  # null = $MSCLIP_FASHION_MNIST_ROOT or /usr/share/datasets/fashion-mnist
    split: str = "train"  # fashion_mnist: train | test
    shuffle_buffer: int = 5000  # webdataset: samples per worker mixed before batching (held encoded); 0 = shard order
    batch_size: int = 32  # per process
    workers: int = 2  # DataLoader worker processes per process
    # webdataset/csv: where JPEGs are decoded: cpu (loader workers; reduced-size decode) | gpu (nvJPEG on the
    # training GPU, in batches; for when the CPU cores cannot keep up; needs CUDA)
    decode: str = "cpu"

    def problems(self, prefix: str = "") -> list[str]:
        """Every unusable value, each naming its field (``prefix`` + name) and value."""
        out = []

        def bad(name: str, message: str) -> None:
            out.append(f"{prefix}{name}={getattr(self, name)!r}: {message}")

        if self.kind not in KINDS:
            bad("kind", f"unknown data kind; expected one of {', '.join(KINDS)}")
        if self.kind in ("webdataset", "csv") and not self.path:
            bad("path", f"data kind {self.kind!r} needs a path")
        if self.resampled and self.kind != "webdataset":
            bad("resampled", f"only supported for webdataset, not {self.kind!r}")
        if self.resampled and not self.num_samples:
            bad("num_samples", "a resampled webdataset needs num_samples (the size of a virtual epoch)")
        if self.split not in ("train", "test"):
            bad("split", "unknown split; expected train or test")
        if self.num_samples is not None and self.num_samples < 1:
            bad("num_samples", "must be positive (or null)")
        if self.shuffle_buffer < 0:
            bad("shuffle_buffer", "must be >= 0 (0 keeps the shard order)")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if self.workers < 0:
            bad("workers", "must be >= 0 (0 loads in the main process)")
        if self.decode not in DECODE_PLACES:
            bad("decode", f"unknown; expected one of {', '.join(DECODE_PLACES)}")
        elif self.decode == "gpu":
            if self.kind not in ("webdataset", "csv"):
                bad("decode", f"gpu decoding is for image-file sources (webdataset, csv), not {self.kind!r}")
            elif not torch.cuda.is_available():
                bad("decode", "gpu decoding needs CUDA, and torch sees no CUDA device here; use decode=cpu")
        if self.caption_templates is not None:
            if not self.caption_templates:
                bad("caption_templates", "must not be empty (null uses the defaults)")
            for t in self.caption_templates:
                if "{}" not in t:
                    out.append(f"{prefix}caption_templates: template {t!r} has no '{{}}' for the class name")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise DataSpecError("; ".join(problems))


@dataclass
class DataStats:
    """Running totals for logs and the final summary (main process only)."""

    seen: int = 0  # samples delivered to the trainer
    skipped_decode: int = 0
    missing_caption: int = 0
    empty_caption: int = 0
    bad_encoding: int = 0
    read_errors: int = 0
    truncated_shards: int = 0
    dropped_partial: int = 0
    shortfall: int = 0  # (the fields' meanings are the comments of COUNT_FIELDS)
    bad_shards: list[str] = field(default_factory=list)  # "url: reason" of each read error / truncation

    def add_counts(self, counts: torch.Tensor) -> None:
        for name, value in zip(COUNT_FIELDS, counts.tolist()):
            setattr(self, name, getattr(self, name) + int(value))

    @property
    def skipped(self) -> int:
        """Samples skipped for a bad image or caption."""
        return sum(getattr(self, k) for k in SAMPLE_SKIPS)

    def as_dict(self) -> dict[str, int]:
        """``seen`` and one count per ``COUNT_FIELDS`` entry (running totals over the epochs iterated)."""
        return {"seen": self.seen, **{k: getattr(self, k) for k in COUNT_FIELDS}}

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


class CountingLoader:
    """Iterates ``(images, tokens)`` from a loader of ``(images, tokens, counts[, problems])`` and keeps
    ``stats``. ``epoch_dropped``: samples per epoch (on this rank) that do not fill the last batch, added
    when the epoch's last batch is handed out (a trainer's ``islice`` never asks for one more)."""

    def __init__(self, loader: Iterable[tuple], num_batches: int, stats: DataStats, epoch_dropped: int = 0) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.stats = stats
        self.epoch_dropped = epoch_dropped

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (images, tokens, counts, *problems) in enumerate(self.loader):
            self.stats.add_counts(counts)
            for found in problems:
                self.stats.bad_shards.extend(found)
            self.stats.seen += images.shape[0]
            if i == self.num_batches - 1:
                self.stats.dropped_partial += self.epoch_dropped
            yield images, tokens


@dataclass
class DataInfo:
    """What ``build_train_data`` returns. ``num_samples``: per epoch over all ranks (exactly what the
    loaders deliver); ``num_batches``: per epoch on this rank."""

    loader: CountingLoader
    num_samples: int
    num_batches: int
    stats: DataStats
    epoch_value: Any = None  # multiprocessing.Value read by workers (shard order, shuffles, captions)
    sampler: Any = None  # DistributedSampler of map-style sources
    kind: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        if self.epoch_value is not None:
            self.epoch_value.value = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)


def shared_epoch(epoch: int) -> Any:
    """An int visible to (persistent) worker processes; created before the workers fork or spawn."""
    return mp.Value("i", epoch)


def counts_tensor(values: dict[str, int]) -> torch.Tensor:
    return torch.tensor([values.get(k, 0) for k in COUNT_FIELDS], dtype=torch.long)


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from several ints (random.Random rejects tuples)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def call_seeded(fn: Callable[[Any], Any], arg: Any, seed: int) -> Any:
    """``fn(arg)`` with torch's CPU generator and Python's ``random`` seeded from ``seed``, both restored
    afterwards (torchvision's random transforms draw from these; CUDA generators are left alone)."""
    gen = torch.default_generator
    saved_torch, saved_py = gen.get_state(), random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        return fn(arg)
    finally:
        gen.set_state(saved_torch)
        random.setstate(saved_py)


AUGMENT_SALT = 0xA06  # keeps augmentation seeds apart from order/caption seeds made of the same ints


class SkipLogger:
    """Logs the first few skips of a process with their reason, then stays quiet (counts still kept)."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.logged = 0

    def __call__(self, reason: str, where: str) -> None:
        if self.logged < self.limit:
            self.logged += 1
            more = " (further skips are only counted)" if self.logged == self.limit else ""
            log.warning("skipping sample %s: %s%s", where, reason, more)


def pin_memory_default() -> bool:
    """Pin the loaders' batches when CUDA is there: the trainer's ``non_blocking`` copy is then asynchronous.
    (A loader does not know the trainer's device; on a CUDA host training on the CPU pinning only costs
    page-locked memory.)"""
    return torch.cuda.is_available()


def transform_image_file(transform: Transform, source: bytes | str | os.PathLike, seed: int,
                         plan: bool = False) -> Any:
    """The seeded training transform of one image file (``bytes`` or a path); raises UndecodableImage.

    A transform with ``decodes_files`` (msclip's ``TrainTransform``) gets the encoded file: its fast path
    (reduced JPEG decode, uint8 out), or with ``plan`` the box and bytes for the device decoder. Any other
    transform gets the fully decoded RGB PIL image, as before."""
    if getattr(transform, "decodes_files", False):
        fn = transform.plan_encoded if plan else transform.from_encoded  # type: ignore[attr-defined]
        return call_seeded(fn, source, seed)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            image = to_rgb(img)  # forces a full decode
    except Exception as exn:  # noqa: BLE001 - any decoder failure is a skip
        raise UndecodableImage.from_error(exn) from None
    return call_seeded(transform, image, seed)
