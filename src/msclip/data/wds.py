"""WebDataset tar shards in the img2dataset layout (``key.jpg|png|webp`` + ``key.txt|json``).

Pipeline per worker: shard list (shuffled per epoch, the same on every rank) -> split by node (explicit
rank) and by worker (or, resampled: shards drawn with replacement) -> tar samples -> shuffle buffer -> decode + caption check (skip and count)
-> transform -> batch + tokenize. ``with_epoch`` repeats the worker's shards as needed and stops after
exactly ``batches_per_worker`` batches, so every worker and rank runs the same number of steps.

Skip counts live in a per-worker ``_WorkerState``; each batch carries the counts accumulated since that
worker's previous batch, and the main-process ``CountingLoader`` sums them.
"""
from __future__ import annotations

import io
import logging
import math
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info
from webdataset.tariterators import base_plus_ext

from msclip.errors import MissingFileError

from .common import COUNT_FIELDS, DataSpecError, SkipLogger, Tokenizer, Transform, counts_tensor, mix_seed
from .formats import WDS_IMAGE_KEYS, wds_captions

log = logging.getLogger(__name__)
MAX_EMPTY_PASSES = 3  # passes over a worker's shards without a single batch before giving up


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


def count_samples(urls: list[str]) -> int:
    """Samples (distinct keys with an image file) in local shards, from the tar headers."""
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise DataSpecError(f"num_samples is required for remote/pipe shards such as {remote[0]!r}")
    total = 0
    for url in urls:
        keys = set()
        with tarfile.open(_local_path(url)) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if key is not None and member.isreg() and ext.lower() in WDS_IMAGE_KEYS:
                    keys.add(key)
        total += len(keys)
    return total


class _WorkerState:
    """Per-worker skip counts; ``take_delta`` hands the not-yet-reported part to the next batch."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_FIELDS, 0)
        self.reported = dict.fromkeys(COUNT_FIELDS, 0)
        self.passes = 0
        self.empty_passes = 0
        self.log = SkipLogger()

    def skip(self, field: str, reason: str, where: str) -> None:
        self.counts[field] += 1
        self.log(reason, where)

    def take_delta(self) -> torch.Tensor:
        delta = {k: self.counts[k] - self.reported[k] for k in COUNT_FIELDS}
        self.reported = dict(self.counts)
        return counts_tensor(delta)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardSource:
    """Yields ``{"url": ...}``: this rank's share of a per-epoch permutation, or resampled draws."""

    def __init__(self, urls: list[str], epoch_value: Any, seed: int, rank: int, world_size: int,
                 resampled: bool, state: _WorkerState) -> None:
        self.urls, self.epoch_value, self.seed = urls, epoch_value, seed
        self.rank, self.world_size, self.resampled, self.state = rank, world_size, resampled, state

    def __call__(self) -> Iterator[dict[str, str]]:
        epoch = self.epoch_value.value
        self.state.passes += 1
        if self.resampled:  # with replacement; differs per rank, worker, epoch and pass
            worker, _ = _worker()
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, worker, self.state.passes))
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        random.Random(mix_seed(self.seed, epoch)).shuffle(urls)  # identical on all ranks: a partition
        # Split by node, then by worker. Not wds.split_by_*: those read RANK/WORKER/NUM_WORKERS from the
        # environment, which would override the explicit rank given here.
        worker, num_workers = _worker()
        for url in urls[self.rank::self.world_size][worker::num_workers]:
            yield {"url": url}


class _ReadErrorHandler:
    """webdataset exception handler: count the error, log it, keep going with the next shard/member."""

    def __init__(self, state: _WorkerState) -> None:
        self.state = state

    def __call__(self, exn: Exception) -> bool:
        self.state.skip("read_errors", f"{type(exn).__name__}: {exn}", "while reading a shard")
        return True


class _Shuffle:
    """Seeded sample shuffle buffer (webdataset's own draws its seed from the clock)."""

    def __init__(self, bufsize: int, seed: int, rank: int, epoch_value: Any, state: _WorkerState) -> None:
        self.bufsize, self.seed, self.rank, self.epoch_value, self.state = bufsize, seed, rank, epoch_value, state

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        rng = random.Random(mix_seed(self.seed, self.epoch_value.value, self.rank, worker, self.state.passes, 7))
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.bufsize:
                i = rng.randrange(len(buf))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _Decode:
    """Raw sample -> ``(image tensor, caption)``; samples without caption or decodable image are counted."""

    def __init__(self, transform: Transform, state: _WorkerState) -> None:
        self.transform, self.state = transform, state

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, str]]:
        for sample in src:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            captions = wds_captions(sample)
            if captions.problem is not None:
                self.state.skip("skipped_caption", f"caption {captions.problem} (.txt, or .json "
                                "captions/caption/text)", where)
                continue
            caption = captions.texts[0]
            ext = next((e for e in WDS_IMAGE_KEYS if e in sample), None)
            if ext is None:
                self.state.skip("skipped_decode", "no image file", where)
                continue
            try:
                with Image.open(io.BytesIO(sample[ext])) as img:
                    image = img.convert("RGB")  # forces a full decode
            except Exception as exn:  # noqa: BLE001 - any decoder failure is a skip
                self.state.skip("skipped_decode", f"{type(exn).__name__}: {exn}", where)
                continue
            yield self.transform(image), caption


class _Batch:
    """Full batches only (equal shapes across ranks); leftovers at the end of a pass are counted."""

    def __init__(self, batch_size: int, tokenizer: Tokenizer, state: _WorkerState) -> None:
        self.batch_size, self.tokenizer, self.state = batch_size, tokenizer, state

    def __call__(self, src: Iterator[tuple[torch.Tensor, str]]
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        images: list[torch.Tensor] = []
        captions: list[str] = []
        produced = False
        for image, caption in src:
            images.append(image)
            captions.append(caption)
            if len(images) == self.batch_size:
                produced = True
                self.state.empty_passes = 0
                yield torch.stack(images), self.tokenizer(captions), self.state.take_delta()
                images, captions = [], []
        self.state.counts["dropped_partial"] += len(images)
        if not produced:
            self.state.empty_passes += 1
            if self.state.empty_passes >= MAX_EMPTY_PASSES:
                raise RuntimeError(f"a data worker's shards gave no full batch of {self.batch_size} in "
                                   f"{MAX_EMPTY_PASSES} passes (skip counts: {self.state.counts})")


def build_wds(spec: Any, *, image_transform: Transform, tokenizer: Tokenizer, batch_size: int, workers: int,
              rank: int, world_size: int, seed: int, epoch_value: Any) -> tuple[wds.WebLoader, int, int, dict]:
    """Returns ``(loader of (images, tokens, counts), batches per rank, samples per epoch, details)``."""
    urls = expand_shards(spec.path)
    n_workers = max(workers, 1)
    streams = world_size * n_workers
    if spec.resampled:
        per_worker = math.ceil(spec.num_samples / (batch_size * streams))
    else:
        if len(urls) < streams:
            raise DataSpecError(f"{spec.path}: {len(urls)} shard(s) for {world_size} rank(s) x {n_workers} "
                             "worker(s); each needs at least one shard (use more shards, fewer workers, or "
                             "resampled=True)")
        total = spec.num_samples or count_samples(urls)
        per_worker = total // (batch_size * streams)
    if per_worker < 1:
        what = f"num_samples={spec.num_samples}" if spec.num_samples else "the samples in the shards"
        raise DataSpecError(f"{spec.path}: {what} cannot give each of {streams} rank x worker streams "
                         f"one batch of {batch_size}")
    state = _WorkerState()
    stages: list[Any] = [_ShardSource(urls, epoch_value, seed, rank, world_size, spec.resampled, state)]
    stages.append(wds.tarfile_to_samples(handler=_ReadErrorHandler(state)))
    if spec.shuffle_buffer > 0:
        stages.append(_Shuffle(spec.shuffle_buffer, seed, rank, epoch_value, state))
    stages += [_Decode(image_transform, state), _Batch(batch_size, tokenizer, state)]
    pipeline = wds.DataPipeline(*stages).with_epoch(per_worker)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    num_batches = per_worker * n_workers
    details = {"shards": len(urls), "batches_per_worker": per_worker}
    log.info("webdataset %s: %d shards, %d batches/rank/epoch", spec.path, len(urls), num_batches)
    return loader, num_batches, num_batches * batch_size * world_size, details
