"""WebDataset tar shards in the img2dataset layout (``key.jpg|png|webp`` + ``key.txt|json``).

Each DataLoader worker runs one stream per epoch: this rank's and worker's share of the epoch's shard
permutation (identical on every rank, so ranks partition the shards), read in order -> one seeded sample
shuffle buffer -> decode + caption check (skip and count) -> seeded augmentation -> full batches. A
worker whose shards run out before its ``batches_per_worker`` batches re-reads them (a new pass, counted as
``shortfall``); the buffer and the batch being filled carry across the pass boundary, so no batch is
dropped there. Resampled: shards are drawn with replacement, one seeded stream per epoch.

Everything is seeded from ``(seed, epoch, rank, worker[, pass])`` and the sample's position in the stream,
never from state a worker keeps between epochs: epoch ``e`` is the same in a fresh process as after
epochs ``0..e-1`` (exact resume). Skip counts are kept per worker for one epoch; each batch carries the
counts since that worker's previous batch, and the main-process ``CountingLoader`` sums them. Sample
problems are counted in a worker's first pass over its shards only, so a re-read bad sample is not
counted twice.
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msclip.errors import MissingFileError
from msclip.transforms import UndecodableImage

from .common import (AUGMENT_SALT, COUNT_FIELDS, DataSpecError, SkipLogger, Tokenizer, Transform, counts_tensor,
                     mix_seed, pin_memory_default, transform_image_file)
from .device_batch import DeviceDecoder, stack_images
from .formats import WDS_IMAGE_KEYS, DataFormatError, wds_captions
from .mapstyle import loader_generator
from .tars import ShardReadError, ShardTruncated, count_image_keys, iter_samples

log = logging.getLogger(__name__)
MAX_EMPTY_PASSES = 3  # passes over a worker's shards without a single usable sample before giving up
CAPTION_COUNTERS = {"missing": "missing_caption", "empty": "empty_caption", "bad_encoding": "bad_encoding",
                    "bad_json": "bad_encoding"}
_SHUFFLE_SALT, _PASS_SALT = 7, 0x9A55


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def _local_path(url: str) -> Path:
    return Path(url[len("file:"):] if url.startswith("file:") else url)


def expand_shards(path: str) -> list[str]:
    """Brace patterns and '::'-joined lists -> URLs; missing local shards raise MissingFileError."""
    urls = wds.shardlists.expand_urls(path)
    if not urls:
        raise DataSpecError(f"no shards in {path!r}")
    missing = [u for u in urls if is_local(u) and not _local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MissingFileError(f"WebDataset shard not found: {', '.join(missing[:3])}{more}")
    return urls


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Samples (distinct keys with an image file) per local shard, from the tar headers. A damaged or cut
    shard is counted up to the damage, with a warning naming it (training then counts it as it reads)."""
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise DataSpecError(f"num_samples is required for remote/pipe shards such as {remote[0]!r}")
    sizes = {}
    for url in urls:
        n, problem = count_image_keys(_local_path(url))
        if problem:
            log.warning("%s; counting its %d readable samples", problem, n)  # the problem names the shard
        sizes[url] = n
    return sizes


def count_samples(urls: list[str]) -> int:
    """The samples of ``shard_sizes``, summed (a shard listed twice counts twice: it is read twice)."""
    sizes = shard_sizes(urls)
    return sum(sizes[u] for u in urls)


class NoUsableSamples(DataFormatError):
    """A data worker's shards yield no usable sample at all; the message names the shards and the counts."""


class _Counts:
    """One worker's counts for one epoch; ``take`` hands the not-yet-reported part to the next batch."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_FIELDS, 0)
        self.problems: list[str] = []  # shard problems not yet reported
        self.reported = dict(self.counts)
        self.log = SkipLogger()

    def skip(self, field: str, reason: str, where: str, pass_index: int) -> None:
        if pass_index == 0:  # a re-read pass meets the same problems again: counted once
            self.counts[field] += 1
            self.log(reason, where)

    def shard_problem(self, field: str, message: str, pass_index: int) -> None:
        if pass_index == 0:
            self.counts[field] += 1
            self.problems.append(message)
            log.warning("%s; going on with the next shard", message)  # always named: shards are few

    def take(self) -> tuple[torch.Tensor, list[str]]:
        delta = {k: self.counts[k] - self.reported[k] for k in COUNT_FIELDS}
        self.reported = dict(self.counts)
        problems, self.problems = self.problems, []
        return counts_tensor(delta), problems


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _open(url: str) -> Any:
    return open(_local_path(url), "rb") if is_local(url) else wds.gopen(url)


class ShardStream(IterableDataset):
    """One epoch of full batches ``(images, tokens, counts, shard problems)`` per worker."""

    def __init__(self, urls: list[str], *, epoch_value: Any, seed: int, rank: int, world_size: int,
                 resampled: bool, shuffle_buffer: int, batches_per_worker: int, batch_size: int,
                 transform: Transform, tokenizer: Tokenizer, decode: str = "cpu",
                 sizes: dict[str, int] | None = None) -> None:
        self.urls, self.epoch_value, self.seed = urls, epoch_value, seed
        self.sizes = sizes  # samples per shard when counted: each worker then reports its own remainder
        self.rank, self.world_size, self.resampled = rank, world_size, resampled
        self.shuffle_buffer, self.batches_per_worker, self.batch_size = shuffle_buffer, batches_per_worker, batch_size
        self.transform, self.tokenizer, self.decode = transform, tokenizer, decode

    # --- shards -> raw samples ----------------------------------------------------------------------------
    def _shards(self, epoch: int, worker: int, num_workers: int) -> Iterator[tuple[str, int]]:
        """``(url, pass index)``; ``("", pass)`` marks the end of a pass."""
        if self.resampled:  # with replacement; one stream per (epoch, rank, worker); every draw counts
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, worker))
            while True:
                yield rng.choice(self.urls), 0
        mine = self._my_shards(epoch, worker, num_workers)
        pass_index = 0
        while True:
            order = list(mine)
            if pass_index:  # a re-read pass visits the shards in another (seeded) order
                random.Random(mix_seed(self.seed, epoch, self.rank, worker, pass_index, _PASS_SALT)).shuffle(order)
            for url in order:
                yield url, pass_index
            yield "", pass_index
            pass_index += 1

    def _my_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        urls = list(self.urls)
        random.Random(mix_seed(self.seed, epoch)).shuffle(urls)  # identical on all ranks: a partition
        # Split by node, then by worker (not wds.split_by_*: those read RANK/WORKER from the environment,
        # which would override the explicit rank given here).
        return urls[self.rank::self.world_size][worker::num_workers]

    def _raw_samples(self, epoch: int, worker: int, num_workers: int, counts: _Counts) -> Iterator[dict | None]:
        """Raw samples; ``None`` after each pass (the shuffle buffer empties there)."""
        empty_passes, got_any = 0, False
        barren_draws = 0  # resampled: shards drawn in a row that gave no sample at all
        for draw, (url, pass_index) in enumerate(self._shards(epoch, worker, num_workers)):
            if self.resampled:  # no passes to count there: a draw budget instead (see _stalled)
                if barren_draws >= self._draw_budget():
                    raise self._no_usable(counts, f"{barren_draws} shard draws in a row")
                barren_draws += 1
            if not url:  # end of a pass
                empty_passes = 0 if got_any else empty_passes + 1
                if empty_passes >= MAX_EMPTY_PASSES:
                    raise self._no_usable(counts, f"{MAX_EMPTY_PASSES} passes")
                got_any = False
                yield None
                continue
            try:
                with _open(url) as stream:
                    for sample in iter_samples(stream, url):
                        sample["__pass__"], sample["__draw__"] = pass_index, draw
                        got_any, barren_draws = True, 0
                        yield sample
            except ShardTruncated as err:
                counts.shard_problem("truncated_shards", str(err), pass_index)
            except (ShardReadError, OSError) as err:
                counts.shard_problem("read_errors", str(err) if url in str(err) else f"{url}: {err}", pass_index)

    def _shuffled(self, src: Iterator[dict | None], rng: random.Random) -> Iterator[dict]:
        """The buffer fills completely before the first draw (no warm-up from a small buffer) and empties
        at the end of each pass, so a pass's samples are all delivered before any is read again."""
        buf: list[dict] = []
        for sample in src:
            if sample is None:
                rng.shuffle(buf)
                yield from buf
                buf = []
                continue
            if self.shuffle_buffer <= 0:
                yield sample
                continue
            buf.append(sample)
            if len(buf) >= self.shuffle_buffer:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    # --- raw -> transformed --------------------------------------------------------------------------------
    def _transformed(self, sample: dict, counts: _Counts, seed: int) -> tuple[Any, str] | None:
        """``(image, caption)``, or None for a skipped (and counted) sample. The image is decoded inside the
        seeded transform: msclip's draws the crop box before it decodes (at reduced size)."""
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        pass_index = sample["__pass__"]  # the buffer mixes two passes near their boundary
        captions = wds_captions(sample)
        if captions.problem is not None:
            counts.skip(CAPTION_COUNTERS[captions.problem], f"caption {captions.problem} (.txt, or .json "
                        "captions/caption/text)", where, pass_index)
            return None
        ext = next((e for e in WDS_IMAGE_KEYS if e in sample), None)
        if ext is None:
            counts.skip("skipped_decode", "no image file", where, pass_index)
            return None
        try:
            image = transform_image_file(self.transform, sample[ext], seed, plan=self.decode == "gpu")
        except UndecodableImage as exn:
            counts.skip("skipped_decode", str(exn), where, pass_index)
            return None
        return image, captions.texts[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
        epoch = int(self.epoch_value.value)
        worker, num_workers = _worker()
        counts = _Counts()
        stream_seed = mix_seed(self.seed, epoch, self.rank, worker)
        raw = self._raw_samples(epoch, worker, num_workers, counts)
        samples = self._shuffled(raw, random.Random(mix_seed(stream_seed, _SHUFFLE_SALT)))
        try:
            share = None
            if self.sizes is not None:
                share = sum(self.sizes.get(u, 0) for u in self._my_shards(epoch, worker, num_workers))
            yield from self._batches(samples, counts, stream_seed, share)
        finally:  # close the open shard now, not when the generator is collected
            samples.close()
            raw.close()

    def _draw_budget(self) -> int:
        """Resampled streams never end a pass; as many shard draws as MAX_EMPTY_PASSES passes would make
        stand in for them, so a stream of only unusable samples stops with an error instead of spinning."""
        return MAX_EMPTY_PASSES * len(self.urls)

    def _no_usable(self, counts: _Counts, span: str) -> NoUsableSamples:
        shown = ", ".join(self.urls[:3]) + (f" and {len(self.urls) - 3} more" if len(self.urls) > 3 else "")
        found = ", ".join(f"{k} {v}" for k, v in counts.counts.items() if v) or "nothing readable"
        return NoUsableSamples(f"{shown}: no usable sample in {span} of a data worker's shards ({found}); every "
                               "sample was unreadable or had no caption: the warnings above name the shards")

    def _stalled(self, sample: dict, last_usable: dict | None) -> bool:
        """No usable sample for MAX_EMPTY_PASSES passes (resampled: that many passes' worth of draws)."""
        if self.resampled:
            return sample["__draw__"] - (last_usable["__draw__"] if last_usable else 0) >= self._draw_budget()
        return sample["__pass__"] - (last_usable["__pass__"] if last_usable else 0) >= MAX_EMPTY_PASSES

    def _batches(self, samples: Iterator[dict], counts: _Counts, stream_seed: int, share: int | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
        """``share``: the samples of this worker's shards (None: not counted); what its first pass leaves
        unread is added to ``dropped_partial`` with the last batch. Samples it read and skipped are counted
        as skips only, so each sample lands in exactly one count."""
        position = 0  # samples delivered by this worker in this epoch: the augmentation seed
        first_pass_read = 0  # samples with an image member taken from the first pass (delivered or skipped)
        last_usable: dict | None = None
        for batch_index in range(self.batches_per_worker):
            images: list[torch.Tensor] = []
            captions: list[str] = []
            while len(images) < self.batch_size:
                sample = next(samples, None)
                if sample is None:
                    raise RuntimeError("a data worker's sample stream ended early")  # not reached: passes repeat
                if sample["__pass__"] == 0 and any(e in sample for e in WDS_IMAGE_KEYS):
                    first_pass_read += 1
                got = self._transformed(sample, counts, mix_seed(stream_seed, position, AUGMENT_SALT))
                if got is None:
                    if self._stalled(sample, last_usable):
                        raise self._no_usable(counts, f"{MAX_EMPTY_PASSES} "
                                              f"{'rounds of shard draws' if self.resampled else 'passes'}")
                    continue
                last_usable = sample
                if sample["__pass__"] > 0:
                    counts.counts["shortfall"] += 1
                images.append(got[0])
                captions.append(got[1])
                position += 1
            if share is not None and batch_index == self.batches_per_worker - 1:
                counts.counts["dropped_partial"] += max(0, share - first_pass_read)
            delta, problems = counts.take()
            yield stack_images(images), self.tokenizer(captions), delta, problems


def device_transform(transform: Transform, where: str) -> Transform:
    """The transform, checked to be one that can plan crops for the device decoder (decode=gpu)."""
    if not getattr(transform, "decodes_files", False):
        raise DataSpecError(f"{where}: decode=gpu needs msclip's training transform (TrainTransform from "
                            f"create_model_and_transforms), not {type(transform).__name__}")
    return transform


def build_wds(spec: Any, *, image_transform: Transform, tokenizer: Tokenizer, batch_size: int, workers: int,
              rank: int, world_size: int, seed: int, epoch_value: Any) -> tuple[DataLoader, int, int, dict]:
    """Returns ``(loader of (images, tokens, counts, problems), batches per rank, samples per epoch, details)``;
    ``details["expected_samples"]``: the epoch size the shards promise (counted or ``num_samples``)."""
    urls = expand_shards(spec.path)
    n_workers = max(workers, 1)
    streams = world_size * n_workers
    sizes: dict[str, int] | None = None
    if spec.resampled:
        total = spec.num_samples
        per_worker = math.ceil(spec.num_samples / (batch_size * streams))
    else:
        if len(urls) < streams:
            raise DataSpecError(f"{spec.path}: {len(urls)} shard(s) for {world_size} rank(s) x {n_workers} "
                                "worker(s); each needs at least one shard (use more shards, fewer workers, or "
                                "resampled=True)")
        sizes = None if spec.num_samples else shard_sizes(urls)
        total = spec.num_samples or sum(sizes[u] for u in urls)
        per_worker = total // (batch_size * streams)
    if per_worker < 1:
        what = f"num_samples={spec.num_samples}" if spec.num_samples else "the samples in the shards"
        raise DataSpecError(f"{spec.path}: {what} cannot give each of {streams} rank x worker streams "
                            f"one batch of {batch_size}")
    dataset = ShardStream(urls, epoch_value=epoch_value, seed=seed, rank=rank, world_size=world_size,
                          resampled=spec.resampled, shuffle_buffer=spec.shuffle_buffer,
                          batches_per_worker=per_worker, batch_size=batch_size, transform=image_transform,
                          tokenizer=tokenizer, decode=spec.decode, sizes=sizes)
    loader: Any = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                             persistent_workers=workers > 0, pin_memory=pin_memory_default(),
                             generator=loader_generator(seed, rank))
    if spec.decode == "gpu":
        loader = DeviceDecoder(loader, device_transform(image_transform, spec.path))
    num_batches = per_worker * n_workers
    # Counted shards: each worker reports what it leaves unread; declared or resampled sizes: the static
    # remainder (expected - delivered), which cannot tell a skipped sample from an unread one.
    details = {"shards": len(urls), "batches_per_worker": per_worker, "expected_samples": total,
               "workers_count_dropped": sizes is not None}
    log.info("webdataset %s: %d shards, %d batches/rank/epoch", spec.path, len(urls), num_batches)
    return loader, num_batches, num_batches * batch_size * world_size, details
