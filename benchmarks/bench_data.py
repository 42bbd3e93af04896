"""Training data throughput per worker core: images/s of decode + random resized crop + normalise at 224 px,
msclip vs open_clip, same WebDataset shards, same run, repetitions interleaved. Goal: >= 1.5x.

The shards hold scikit-image's photos re-encoded as JPEG (quality 90) with the shorter side drawn from
256..640 px, and captions. Both sides run their whole training pipeline in one process (num_workers=0,
torch threads 1), so the figure is what one loader worker delivers:
  open_clip: open_clip_train.data.get_wds_dataset + open_clip.transform.image_transform(224, is_train=True)
             (full PIL decode, RandomResizedCrop, float tensor, Normalize)
  msclip:    msclip.data.build_train_data(kind=webdataset) with the model's training transform (box first,
             reduced-size JPEG decode, one resample, uint8), plus msclip.data.device_batch.images_to_model_input
             run here on the CPU (on a GPU run it is done on the device), so normalisation is counted too.
Both get the same stand-in tokenizer (the image path is compared, not the two BPE tokenizers).

A second table splits msclip's gain into its steps, on the same JPEG bytes held in memory (no tar reading).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import io
import random
import statistics
import sys
import tempfile
import tarfile
import time
import types
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402

from msclip.config import PreprocessCfg  # noqa: E402
from msclip.data import DataSpec, build_train_data  # noqa: E402
from msclip.data.common import call_seeded  # noqa: E402
from msclip.data.device_batch import images_to_model_input  # noqa: E402
from msclip.transforms import image_transform  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "horse", "camera", "coins", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel", "cat", "moon", "brick", "grass", "gravel", "page")
SIZE, CTX = 224, 77


def photo(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype == bool:  # horse is a mask
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    photos = [photo(p) for p in PHOTOS]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        short = rng.randint(256, 640)
        k = short / min(img.size)
        resized = img.resize((round(img.size[0] * k), round(img.size[1] * k)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        resized.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: Path, jpegs: list[bytes], n_shards: int) -> str:
    per = -(-len(jpegs) // n_shards)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(s * per, min(len(jpegs), (s + 1) * per)):
                for name, blob in ((f"{i:06d}.jpg", jpegs[i]), (f"{i:06d}.txt", f"a photo, number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return f"{root}/shard-{{000..{n_shards - 1:03d}}}.tar"


def stub_tokenizer(texts: str | list[str]) -> torch.Tensor:
    """Same cost for both sides: a fixed-size zero tensor per caption."""
    return torch.zeros(1 if isinstance(texts, str) else len(texts), CTX, dtype=torch.long)


def import_open_clip_data():
    """open_clip_train.data imports pandas for its CSV dataset only; a stand-in lets the WebDataset part load
    where pandas is not installed (it is not an msclip dependency)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stub
    import open_clip_train.data as oc_data

    return oc_data


def open_clip_epoch(pattern: str, n: int, batch: int) -> Callable[[], int]:
    from open_clip.transform import image_transform as oc_transform

    oc_data = import_open_clip_data()
    args = argparse.Namespace(train_data=pattern, val_data=None, train_num_samples=n, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=0, world_size=1)
    preprocess = oc_transform(SIZE, is_train=True)
    info = oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=stub_tokenizer)

    def run() -> int:
        seen = 0
        for images, _ in info.dataloader:
            seen += images.shape[0]
        return seen

    return run


def msclip_epoch(pattern: str, n: int, batch: int) -> Callable[[], int]:
    cfg = PreprocessCfg()
    tf = image_transform(cfg, SIZE, is_train=True)
    info = build_train_data(DataSpec("webdataset", path=pattern, num_samples=n), image_transform=tf,
                            tokenizer=stub_tokenizer, batch_size=batch, workers=0)

    def run() -> int:
        seen = 0
        for images, _ in info.loader:
            seen += images_to_model_input(images, "cpu", cfg.mean, cfg.std).shape[0]
        return seen

    return run


def rates(fns: dict[str, Callable[[], int]], reps: int) -> dict[str, list[float]]:
    """images/s of each function, the functions interleaved in every repetition (after one warm-up each)."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            count = fn()
            out[name].append(count / (time.perf_counter() - t0))
    return out


def step_variants(jpegs: list[bytes]) -> dict[str, Callable[[], int]]:
    """msclip's steps added one at a time, each a function over the same in-memory JPEGs."""
    cfg = PreprocessCfg()
    tf = image_transform(cfg, SIZE, is_train=True)
    norm = T.Normalize(cfg.mean, cfg.std)

    def full_decode_box_first(data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return tf.crop_resize(img, tf.crop_box(img))

    variants = {
        "reference: full decode, RRC, float, normalise": lambda d: tf(Image.open(io.BytesIO(d)).convert("RGB")),
        "+ box first, one resample (full decode)": lambda d: norm(full_decode_box_first(d).float() / 255),
        "+ reduced-size JPEG decode (draft)": lambda d: norm(tf.from_encoded(d).float() / 255),
        "+ uint8 out (normalise on the device)": tf.from_encoded,
    }

    def over_all(fn: Callable[[bytes], torch.Tensor]) -> Callable[[], int]:
        return lambda: sum(call_seeded(fn, d, i) is not None for i, d in enumerate(jpegs))

    return {name: over_all(fn) for name, fn in variants.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=192, help="images in the shards (default 192)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    jpegs = make_jpegs(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), jpegs, n_shards=4)
        got = rates({"msclip": msclip_epoch(pattern, args.images, args.batch),
                     "open_clip": open_clip_epoch(pattern, args.images, args.batch)}, args.reps)
    ours, ref = max(got["msclip"]), max(got["open_clip"])
    paired = statistics.median(a / b for a, b in zip(got["msclip"], got["open_clip"]))
    print_table(f"WebDataset training pipeline, {args.images} JPEGs (short side 256-640), {SIZE} px, images/s on one "
                "core (best of the interleaved repetitions)",
                [("decode + random resized crop + normalise", ours, ref)])
    print(f"median of the per-repetition ratios: {paired:.2f}x (goal >= 1.5x)")

    steps = rates(step_variants(jpegs[: max(32, args.images // 2)]), max(2, args.reps - 1))
    print("\nmsclip's steps, in-memory JPEGs, images/s on one core (best of the interleaved repetitions)")
    base = max(next(iter(steps.values())))
    for name, values in steps.items():
        print(f"{name:<52}{max(values):>10.1f}{max(values) / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
