"""Readers for evaluation data on local disk (nothing is ever downloaded).

Layouts, tried in this order for a dataset root and split name:
* ``wds``: CLIP_benchmark WebDataset shards ``ROOT/<split>/*.tar`` (samples grouped by key; image in
  .jpg/.jpeg/.png/.webp, label in .cls, captions in .txt/.json); class names in ``ROOT/classnames.txt``;
* ``torchvision``: the dataset's torchvision class with ``download=False`` (when the entry has one);
* ``folder``: ``ROOT/<split>/<class>/<image>`` (class order: sorted folders of the first split read);
* ``csv``: ``ROOT/<split>.csv`` with columns ``filepath,label`` (paths relative to ROOT; label an int,
  a class name, or ``;``-separated ints for multi-label);
* ``jsonl``: ``ROOT/<split>.jsonl`` with ``img`` and ``label`` fields (the Hateful Memes release);
* ``idx``: MNIST-style ``ROOT/{train,t10k}-images-idx3-ubyte[.gz]`` plus labels.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from msclip.data.formats import WDS_IMAGE_KEYS
from msclip.data.formats import read_idx as read_idx_file
from msclip.eval.imagefolder import DataError, is_hidden, walk_images
from msclip.transforms import to_rgb

# members read as text (the label and the caption members); every other member is kept as a TarMember
WDS_TEXT_FIELDS = ("cls", "txt", "json", "text", "caption")


@dataclass(frozen=True)
class TarMember:
    """Bytes of one file inside an (uncompressed) tar shard, read by seeking: cheap and fork-safe."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def open_image(source: Any) -> Image.Image:
    """RGB PIL image from a path, a TarMember or a uint8 array."""
    if isinstance(source, TarMember):
        img = Image.open(io.BytesIO(source.read()))
    elif isinstance(source, np.ndarray):
        img = Image.fromarray(source)
    else:
        img = Image.open(source)
    return to_rgb(img)


class Samples(torch.utils.data.Dataset):
    """(source, label) pairs -> (PIL image, label); labels are ints or multi-hot lists."""

    def __init__(self, sources: list, labels: list, classnames: list[str] | None = None, layout: str = ""):
        if len(sources) != len(labels):
            raise ValueError(f"{len(sources)} images but {len(labels)} labels")
        self.sources, self.labels, self.classnames, self.layout = sources, labels, classnames, layout

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[Image.Image, Any]:
        return open_image(self.sources[i]), self.labels[i]


class Mapped(torch.utils.data.Dataset):
    """A torchvision dataset with its target mapped (e.g. VOC annotation -> multi-hot) and RGB images."""

    def __init__(self, base: Any, target_fn: Callable[[Any], Any] | None = None, classnames=None,
                 layout: str = "torchvision"):
        self.base, self.target_fn, self.layout = base, target_fn, layout
        self.classnames = classnames or getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, target = self.base[i]
        img = img.convert("RGB") if isinstance(img, Image.Image) else img
        return img, self.target_fn(target) if self.target_fn else target


# ------------------------------------------------------------------------- webdataset shards
def _shard_order(p: Path) -> tuple:
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)


def index_tar_shards(shards: list[str]) -> list[dict]:
    """Group tar members by sample key. Image fields become TarMembers, text fields their decoded text."""
    samples: list[dict] = []
    for shard in shards:
        try:
            samples += _index_shard(shard)
        except (tarfile.TarError, EOFError) as e:
            raise DataError(f"shard {shard}: not a readable tar archive ({e})") from None
    return samples


def _index_shard(shard: str) -> list[dict]:
    """One shard's samples, in member order (a sample's members are adjacent in a WebDataset tar)."""
    samples: list[dict] = []
    with tarfile.open(shard, "r:") as tar:
        current: dict | None = None
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base or base.startswith("."):
                continue
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            ext = base.split(".", 1)[1].lower()
            if current is None or current["__key__"] != key:
                current = {"__key__": key, "__shard__": shard}
                samples.append(current)
            if ext in WDS_TEXT_FIELDS:
                current[ext] = tar.extractfile(m).read().decode("utf-8", errors="replace")
            else:
                current[ext] = TarMember(shard, m.offset_data, m.size)
    return samples


def wds_image(sample: dict) -> TarMember | None:
    return next((sample[f] for f in WDS_IMAGE_KEYS if f in sample), None)


def find_shards(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [str(p)]
    if p.is_dir():
        return [str(s) for s in sorted(p.glob("*.tar"), key=_shard_order)]
    return []


def _read_lines(path: Path) -> list[str] | None:
    return [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()] if path.is_file() \
        else None


def read_wds(root: Path, split: str, multilabel: bool = False) -> Samples | None:
    shards = find_shards(root / split)
    if not shards:
        return None
    sources, labels = [], []
    for s in index_tar_shards(shards):
        img = wds_image(s)
        if img is None or "cls" not in s:
            continue  # a sample without image or label cannot be probed; counted by the length check below
        sources.append(img)
        labels.append(_parse_label(s["cls"], None, multilabel))
    if not sources:
        raise ValueError(f"{root / split}: shards hold no sample with an image and a .cls label")
    return Samples(sources, labels, _read_lines(root / "classnames.txt"), "wds")


# ------------------------------------------------------------------------- folder / csv / jsonl / idx
def read_folder(root: Path, split: str, classes: list[str] | None = None) -> Samples | None:
    base = root / split if split else root
    if not base.is_dir():
        return None
    found = sorted(d.name for d in base.iterdir() if d.is_dir() and not is_hidden(d.name))
    if not found:
        return None
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{base}: class folders {unknown[:5]} are not in the training split's classes")
    index = {c: i for i, c in enumerate(classes)}
    sources, labels = [], []
    for c in found:
        files = walk_images(str(base / c))
        sources += files
        labels += [index[c]] * len(files)
    return Samples(sources, labels, list(classes), "folder")


def _parse_label(value: str, names: dict[str, int] | None, multilabel: bool) -> Any:
    value = value.strip()
    if multilabel:
        return [int(v) for v in value.split(";")]
    if value.lstrip("-").isdigit():
        return int(value)
    if names is not None and value in names:
        return names[value]
    raise ValueError(f"label {value!r} is neither an integer nor a known class name")


def read_csv(root: Path, split: str, classnames: list[str] | None, multilabel: bool = False) -> Samples | None:
    path = root / f"{split}.csv"
    if not path.is_file():
        return None
    names = {c: i for i, c in enumerate(classnames)} if classnames else None
    sources, labels = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filepath", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with columns filepath,label (found {reader.fieldnames})")
        for row_no, row in enumerate(reader, start=2):
            try:
                labels.append(_parse_label(row["label"], names, multilabel))
            except ValueError as e:
                raise ValueError(f"{path}:{row_no}: {e}") from e
            sources.append(str(root / row["filepath"]))
    return Samples(sources, labels, classnames, "csv")


def read_jsonl(root: Path, split: str) -> Samples | None:
    path = root / f"{split}.jsonl"
    if not path.is_file():
        return None
    sources, labels = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            rec = json.loads(line)
            if "img" not in rec or "label" not in rec:
                raise ValueError(f"{path}:{line_no}: record needs 'img' and 'label' fields")
            sources.append(str(root / rec["img"]))
            labels.append(int(rec["label"]))
    return Samples(sources, labels, None, "jsonl")


def read_idx(root: Path, split: str) -> Samples | None:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        return None
    for sub in (root, root / "raw"):
        for suffix in ("", ".gz"):
            img, lab = sub / f"{prefix}-images-idx3-ubyte{suffix}", sub / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                images, labels = read_idx_file(img), read_idx_file(lab).astype(np.int64)
                return Samples(list(images), labels.tolist(), None, "idx")
    return None


# ------------------------------------------------------------------------- splits without official files
def carve(ds: torch.utils.data.Dataset, labels: list[int], role: str, seed: int = 0,
          train_per_class: int | None = None, train_fraction: float = 0.8) -> torch.utils.data.Subset:
    """Deterministic per-class train/test split of a pool (for datasets released without one)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    keep: list[int] = []
    for y in sorted(by_class):
        idx = [by_class[y][j] for j in torch.randperm(len(by_class[y]), generator=g).tolist()]
        cut = train_per_class if train_per_class is not None else int(round(len(idx) * train_fraction))
        keep += idx[:cut] if role == "train" else idx[cut:]
    sub = torch.utils.data.Subset(ds, sorted(keep))
    sub.classnames = getattr(ds, "classnames", None)  # type: ignore[attr-defined]
    sub.layout = getattr(ds, "layout", "") + "+seeded-split"  # type: ignore[attr-defined]
    return sub


def dataset_labels(ds: Any) -> list:
    """Labels without decoding images, where the dataset exposes them."""
    for attr in ("labels", "targets", "_labels", "y"):
        v = getattr(ds, attr, None)
        if v is not None:
            return list(v)
    raise ValueError(f"{type(ds).__name__}: cannot read labels without loading images")

