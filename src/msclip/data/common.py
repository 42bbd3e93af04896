"""Shared pieces of the training data sources: the spec (also the recipe's ``data`` section), the result,
and skip accounting.

Skip counts are produced inside DataLoader worker processes, so they cannot live in a shared Python
object. Every batch carries a small ``counts`` tensor (skips since the previous batch of that worker);
``CountingLoader`` strips it in the main process and adds it to ``DataStats``. Nothing is lost when a
worker process exits, and nothing needs locks.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from msclip.errors import MsclipError

log = logging.getLogger(__name__)

# Order of the entries of the per-batch counts tensor.
COUNT_FIELDS = ("skipped_decode", "skipped_caption", "dropped_partial", "read_errors")
KINDS = ("webdataset", "csv", "fashion_mnist", "synthetic")

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
    shuffle_buffer: int = 1000  # webdataset sample shuffle buffer; 0 keeps shard order
    batch_size: int = 32  # per process
    workers: int = 2  # DataLoader worker processes per process

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
    skipped_decode: int = 0  # image missing or undecodable
    skipped_caption: int = 0  # caption missing or empty
    dropped_partial: int = 0  # valid samples left over when a shard pass ends mid-batch (webdataset)
    read_errors: int = 0  # shard/tar level errors (the rest of that shard is skipped)

    def add_counts(self, counts: torch.Tensor) -> None:
        for name, value in zip(COUNT_FIELDS, counts.tolist()):
            setattr(self, name, getattr(self, name) + int(value))

    @property
    def skipped(self) -> int:
        return self.skipped_decode + self.skipped_caption

    def as_dict(self) -> dict[str, int]:
        return {"seen": self.seen, **{k: getattr(self, k) for k in COUNT_FIELDS}}

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


class CountingLoader:
    """Iterates ``(images, tokens)`` from a loader of ``(images, tokens, counts)`` and keeps ``stats``."""

    def __init__(self, loader: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_batches: int,
                 stats: DataStats) -> None:
        self.loader = loader
        self.num_batches = num_batches
        self.stats = stats

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, counts in self.loader:
            self.stats.add_counts(counts)
            self.stats.seen += images.shape[0]
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
