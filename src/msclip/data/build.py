"""``build_train_data``: one entry point for every training source."""
from __future__ import annotations

from .common import CountingLoader, DataInfo, DataSpec, DataSpecError, DataStats, Tokenizer, Transform, shared_epoch

SYNTHETIC_DEFAULT_SAMPLES = 512


def build_train_data(spec: DataSpec, *, image_transform: Transform, tokenizer: Tokenizer,
                     batch_size: int | None = None, workers: int | None = None, rank: int = 0, world_size: int = 1,
                     seed: int = 0, epoch: int = 0) -> DataInfo:
    """Build the shuffled, sharded training loader of ``(images [B,3,H,W], tokens [B,T] long)``.

    Images are float (the transform's output), except Fashion-MNIST with the package's training transform:
    its batches are made whole (``fashion_mnist.FashionMNISTBatches``) and stay uint8, normalised on the device
    by ``device_batch.images_to_model_input`` with the model's mean/std (the transform's Normalize values).

    ``batch_size`` (per rank) and ``workers`` default to the spec's; every batch is full. Call
    ``info.set_epoch(e)`` before each epoch (an epoch's batches depend on ``(seed, epoch)`` only, so a fresh
    loader set to epoch ``e`` replays it exactly); read ``info.stats.as_dict()`` for samples seen and
    skipped per category (``COUNT_FIELDS``; counted in the main process, per rank).
    """
    spec.validate()
    batch_size = spec.batch_size if batch_size is None else batch_size
    workers = spec.workers if workers is None else workers
    if batch_size < 1 or workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise DataSpecError(f"bad loader settings: batch_size={batch_size}, workers={workers}, "
                         f"rank={rank}, world_size={world_size}")
    epoch_value = shared_epoch(epoch)
    stats = DataStats()
    if spec.kind == "webdataset":
        from .wds import build_wds  # webdataset is an optional (train) dependency

        loader, num_batches, num_samples, details = build_wds(
            spec, image_transform=image_transform, tokenizer=tokenizer, batch_size=batch_size, workers=workers,
            rank=rank, world_size=world_size, seed=seed, epoch_value=epoch_value)
        dropped = 0 if details["workers_count_dropped"] else _epoch_dropped(details["expected_samples"],
                                                                            num_samples, rank)
        return DataInfo(CountingLoader(loader, num_batches, stats, dropped), num_samples, num_batches, stats,
                        epoch_value=epoch_value, kind=spec.kind, details=details)

    from . import mapstyle

    collate, extra = None, {}
    if spec.kind == "csv":
        dataset = mapstyle.csv_dataset(spec, image_transform, seed=seed)
        name = spec.path
    elif spec.kind == "fashion_mnist":
        from . import fashion_mnist as fm

        images, labels = fm.load_fashion_mnist(spec.split, spec.fashion_mnist_root)
        name = f"fashion_mnist/{spec.split}"
        crop = fm.batch_crop_spec(image_transform)
        if crop is not None:  # the package's train transform: whole batches as tensors, images left uint8
            dataset = fm.FashionMNISTBatches(images, labels, crop, tokenizer, spec.caption_templates, seed)
            collate, extra = fm.whole_batch, {"batch_path": True}
        else:
            dataset = fm.FashionMNISTCaptions(images, labels, image_transform, spec.caption_templates, seed,
                                              epoch_value)
    else:  # synthetic
        dataset = mapstyle.SyntheticCaptions(spec.num_samples or SYNTHETIC_DEFAULT_SAMPLES, image_transform,
                                             seed=seed)
        name = "synthetic"
    loader, sampler, num_batches = mapstyle.map_loader(
        dataset, tokenizer=tokenizer, batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
        seed=seed, epoch=epoch, name=name, collate_fn=collate)
    num_samples = num_batches * batch_size * world_size
    dropped = _epoch_dropped(len(dataset), num_samples, rank)
    return DataInfo(CountingLoader(loader, num_batches, stats, dropped), num_samples,
                    num_batches, stats, epoch_value=epoch_value, sampler=sampler, kind=spec.kind,
                    details={"dataset_size": len(dataset), "expected_samples": len(dataset), **extra})


def _epoch_dropped(expected: int, delivered: int, rank: int) -> int:
    """Samples an epoch leaves out (they do not fill full batches on every rank x worker), attributed to
    rank 0 so that the sum over ranks counts them once."""
    return max(0, expected - delivered) if rank == 0 else 0
