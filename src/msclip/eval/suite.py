"""The linear-probe suite: a registry of datasets (splits, class names, metric, readers) and the runner.

`msclip24` is CLIP's 27-dataset linear-probe suite without Birdsnap and the two video sets. Metrics follow
the CLIP paper: mean per-class accuracy for FGVC Aircraft, Oxford Pets, Caltech-101 and Flowers-102,
11-point mAP for VOC 2007, ROC AUC for Hateful Memes, accuracy elsewhere. Data is read from local files
only (see suite_datasets for the layouts); a dataset that is absent is reported as missing with the
layouts that were looked for, and the rest of the suite still runs.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from msclip.errors import MissingFileError

from . import suite_datasets as sd

log = logging.getLogger(__name__)

DIGITS = tuple(str(i) for i in range(10))
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class MissingDataset(MissingFileError):
    """A suite dataset is not on disk; the message gives the layout that was expected."""

    def __init__(self, name: str, expected_layout: str):
        super().__init__(f"dataset {name!r} not found; expected {expected_layout}")
        self.expected_layout = expected_layout


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    metric: str = "accuracy"
    splits: tuple[str, str | None, str] = ("train", None, "test")  # (train, val, test) split names
    classnames: tuple[str, ...] | None = None  # None: taken from the data
    tv: Callable[[str, str | None], Any] | None = None  # (root, split) -> torchvision dataset, download=False
    target_fn: Callable[[Any], Any] | None = None  # maps the torchvision target to our label
    multilabel: bool = False
    pool: dict | None = None  # no official split: carve train/test ({"train_per_class": n} or train_fraction)
    aliases: tuple[str, ...] = ()  # other folder names under --data-root (e.g. CLIP_benchmark's wds_*)
    note: str = ""


def _tv(cls_name: str, split_kw: str | None = "split", split_map: dict | None = None, **fixed) -> Callable:
    """Builder for a torchvision dataset class, never downloading."""
    def build(root: str, split: str | None) -> Any:
        import torchvision.datasets as tvd

        kwargs = dict(fixed)
        if split_kw == "train":
            kwargs["train"] = split == "train"
        elif split_kw is not None and split is not None:
            kwargs[split_kw] = (split_map or {}).get(split, split)
        if cls_name not in ("FER2013", "ImageNet"):
            kwargs["download"] = False
        return getattr(tvd, cls_name)(root, **kwargs)
    build.__name__ = f"torchvision.datasets.{cls_name}"
    return build


def _voc_target(target: dict) -> list[int]:
    """VOC annotation -> 20 labels: 1 present, -1 only 'difficult' instances (ignored), 0 absent."""
    objs = target["annotation"].get("object", [])
    objs = [objs] if isinstance(objs, dict) else objs
    out = [0] * len(VOC_CLASSES)
    for o in objs:
        j = VOC_CLASSES.index(o["name"])
        if str(o.get("difficult", "0")) == "1":
            out[j] = out[j] or -1
        else:
            out[j] = 1
    return out


def _S(name: str, **kw) -> DatasetSpec:
    return DatasetSpec(name, **kw)


SUITE_MSCLIP24: tuple[DatasetSpec, ...] = (
    _S("food101", tv=_tv("Food101"), aliases=("wds_food101",)),
    _S("cifar10", tv=_tv("CIFAR10", "train"), aliases=("wds_vtab-cifar10", "wds_cifar10"),
       classnames=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    _S("cifar100", tv=_tv("CIFAR100", "train"), aliases=("wds_vtab-cifar100", "wds_cifar100")),
    _S("sun397", aliases=("wds_sun397",), note="torchvision's SUN397 has no partitions: use wds/folder/csv"),
    _S("cars", tv=_tv("StanfordCars"), aliases=("stanford_cars", "wds_cars")),
    _S("fgvc_aircraft", metric="mean_per_class", splits=("train", "val", "test"),
       tv=_tv("FGVCAircraft", annotation_level="variant"), aliases=("wds_fgvc_aircraft",)),
    _S("voc2007", metric="map11", multilabel=True, splits=("train", "val", "test"), classnames=VOC_CLASSES,
       tv=_tv("VOCDetection", "image_set", year="2007"), target_fn=_voc_target, aliases=("wds_voc2007",),
       note="multi-label; csv/wds labels are ';'-separated class ids"),
    _S("dtd", splits=("train", "val", "test"), tv=_tv("DTD", partition=1), aliases=("wds_dtd",)),
    _S("pets", metric="mean_per_class", splits=("trainval", None, "test"), tv=_tv("OxfordIIITPet"),
       aliases=("oxford_pets", "wds_vtab-pets")),
    _S("caltech101", metric="mean_per_class", tv=_tv("Caltech101", None, target_type="category"),
       pool={"train_per_class": 30}, aliases=("wds_vtab-caltech101",),
       note="torchvision pool split seeded: 30 train images per class, the rest test"),
    _S("flowers102", metric="mean_per_class", splits=("train", "val", "test"), tv=_tv("Flowers102"),
       aliases=("wds_vtab-flowers",)),
    _S("mnist", tv=_tv("MNIST", "train"), classnames=DIGITS, aliases=("wds_mnist",)),
    _S("fer2013", tv=_tv("FER2013"), aliases=("wds_fer2013",),
       classnames=("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")),
    _S("stl10", tv=_tv("STL10"), aliases=("wds_stl10",),
       classnames=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")),
    _S("eurosat", tv=_tv("EuroSAT", None), pool={"train_fraction": 0.8}, aliases=("wds_vtab-eurosat",)),
    _S("resisc45", pool={"train_fraction": 0.8}, aliases=("NWPU-RESISC45", "wds_vtab-resisc45")),
    _S("gtsrb", tv=_tv("GTSRB"), aliases=("wds_gtsrb",)),
    _S("kitti_distance", splits=("train", "val", "test"), aliases=("wds_vtab-kitti_closest_vehicle_distance",),
       classnames=("car on my left or right", "car nearby", "car in the distance", "no car"),
       note="no torchvision reader: use wds/folder/csv"),
    _S("country211", splits=("train", "valid", "test"), tv=_tv("Country211"), aliases=("wds_country211",)),
    _S("pcam", splits=("train", "val", "test"), tv=_tv("PCAM"), aliases=("wds_vtab-pcam",),
       classnames=("lymph node", "lymph node containing metastatic tumor tissue")),
    _S("clevr_count", splits=("train", None, "val"), tv=_tv("CLEVRClassification"), target_fn=lambda y: int(y) - 3,
       classnames=tuple(str(i) for i in range(3, 11)), aliases=("wds_vtab-clevr_count_all",),
       note="torchvision's CLEVR test split has no labels, so its val split is the test split"),
    _S("hateful_memes", metric="roc_auc", splits=("train", None, "dev"), aliases=("wds_hateful_memes",),
       classnames=("not hateful", "hateful"), note="jsonl layout: ROOT/train.jsonl, ROOT/dev.jsonl (or dev_seen)"),
    _S("renderedsst2", splits=("train", "val", "test"), tv=_tv("RenderedSST2"), aliases=("wds_renderedsst2",),
       classnames=("negative", "positive")),
    _S("imagenet1k", splits=("train", None, "val"), tv=_tv("ImageNet"), aliases=("imagenet", "wds_imagenet1k")),
)
SUITES = {"msclip24": SUITE_MSCLIP24}
EXTRA = (
    _S("fashion_mnist", aliases=("fashion-mnist",),
       classnames=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")),
)
REGISTRY = {s.name: s for s in SUITE_MSCLIP24 + EXTRA}


def get_spec(name: str) -> DatasetSpec:
    """Registry entry, or a generic single-label entry (any layout, accuracy) for other names."""
    def norm(n: str) -> str:
        return n.lower().replace("-", "_")

    key = norm(name)
    return REGISTRY.get(key) or next((s for s in REGISTRY.values() if key in map(norm, s.aliases)), None) \
        or DatasetSpec(name)


def expected_layout(spec: DatasetSpec) -> str:
    tr, va, te = spec.splits
    splits = "{" + ",".join(s for s in (tr, va, te) if s) + "}"
    ways = [f"WebDataset shards ROOT/{splits}/*.tar with .cls labels (CLIP_benchmark layout)"]
    if spec.tv is not None:
        ways.append(f"{spec.tv.__name__}(ROOT, download=False) files")
    ways += [f"image folders ROOT/{splits}/<class>/<image>" + (" or ROOT/<class>/<image>" if spec.pool else ""),
             f"CSV files ROOT/{splits}.csv with columns filepath,label"]
    if spec.metric == "roc_auc":
        ways.append(f"JSON lines ROOT/{splits}.jsonl with img,label")
    if spec.name in ("mnist", "fashion_mnist"):
        ways.append("IDX files ROOT/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    return "; or ".join(ways) + (f" ({spec.note})" if spec.note else "")


def _to_multihot(ds: Any, n: int) -> Any:
    """csv/wds multi-label rows list the positive class ids; turn them into {1, 0} vectors."""
    if isinstance(ds, sd.Samples) and ds.labels and isinstance(ds.labels[0], list) and len(ds.labels[0]) != n:
        ds.labels = [[1 if j in set(pos) else 0 for j in range(n)] for pos in ds.labels]
    return ds


def _read_split(spec: DatasetSpec, root: Path, split: str, classes: list[str] | None, errors: list[str]) -> Any:
    try:
        ds = sd.read_wds(root, split, spec.multilabel)
        if ds is not None:
            return ds
    except (OSError, ValueError) as e:
        raise ValueError(f"{root / split}: unreadable WebDataset shards: {e}") from e
    if spec.tv is not None and not spec.pool:
        try:
            return sd.Mapped(spec.tv(str(root), split), spec.target_fn, list(spec.classnames or []) or None)
        except (RuntimeError, FileNotFoundError, OSError, ImportError) as e:
            errors.append(f"{spec.tv.__name__}: {e}")
    ds = sd.read_folder(root, split, classes)
    if ds is None:
        ds = sd.read_csv(root, split, classes or (list(spec.classnames) if spec.classnames else None),
                         spec.multilabel)
    if ds is None:
        ds = sd.read_jsonl(root, split) or sd.read_jsonl(root, f"{split}_seen")
    if ds is None and spec.name in ("mnist", "fashion_mnist"):
        ds = sd.read_idx(root, "train" if split == "train" else "test")
    return ds


def _read_pool(spec: DatasetSpec, root: Path, errors: list[str]) -> Any:
    if spec.tv is not None:
        try:
            return sd.Mapped(spec.tv(str(root), None), spec.target_fn)
        except (RuntimeError, FileNotFoundError, OSError, ImportError) as e:
            errors.append(f"{spec.tv.__name__}: {e}")
    return sd.read_folder(root, "")


def load_splits(spec: DatasetSpec, root: str | Path, seed: int = 0) -> dict[str, Any]:
    """{"train", "val" (or None: carve from train), "test"} datasets of (PIL, label); MissingDataset if absent."""
    root = Path(root)
    if not root.exists():
        raise MissingDataset(spec.name, expected_layout(spec))
    tr, va, te = spec.splits
    errors: list[str] = []
    train = _read_split(spec, root, tr, None, errors)
    if train is not None:
        classes = getattr(train, "classnames", None)
        classes = classes if isinstance(train, sd.Samples) and train.layout == "folder" else None
        test = _read_split(spec, root, te, classes, errors)
        val = _read_split(spec, root, va, classes, errors) if va else None
    elif spec.pool:
        pool = _read_pool(spec, root, errors)
        if pool is None:
            test = None
        else:
            labels = sd.dataset_labels(pool.base if isinstance(pool, sd.Mapped) else pool)
            if isinstance(pool, sd.Mapped) and spec.target_fn:
                labels = [spec.target_fn(y) for y in labels]
            train, test = (sd.carve(pool, labels, r, seed, **spec.pool) for r in ("train", "test"))
            val = None
    else:
        test = None
    if train is None or test is None:
        detail = f" [{'; '.join(errors)}]" if errors else ""
        raise MissingDataset(spec.name, f"under {root}: " + expected_layout(spec) + detail)
    if spec.multilabel:
        n = len(spec.classnames or ())
        train, val, test = (_to_multihot(d, n) if d is not None else None for d in (train, val, test))
    return {"train": train, "val": val, "test": test}


def classnames_of(spec: DatasetSpec, ds: Any) -> list[str] | None:
    names = getattr(ds, "classnames", None) or (list(spec.classnames) if spec.classnames else None)
    return list(names) if names else None


def find_root(spec: DatasetSpec, data_root: str | Path) -> Path:
    """ROOT/<name> or ROOT/<alias>; the first that exists (else ROOT/<name>, reported missing later)."""
    for n in (spec.name,) + spec.aliases:
        if (Path(data_root) / n).exists():
            return Path(data_root) / n
    return Path(data_root) / spec.name


# ------------------------------------------------------------------------- runner
@dataclass
class SuiteRun:
    results: dict[str, dict] = field(default_factory=dict)

    def summary(self) -> dict:
        ok = {k: v for k, v in self.results.items() if v.get("status") == "ok"}
        mean = sum(v["score_pct"] for v in ok.values()) / len(ok) if ok else None
        return {"mean_pct": mean, "n_ok": len(ok),
                "n_missing": sum(v.get("status") == "missing" for v in self.results.values()),
                "n_error": sum(v.get("status") == "error" for v in self.results.values())}


def run_suite(entries: list[tuple[DatasetSpec, Path]],
              featurize: Callable[[DatasetSpec, Path, str, Any], dict],
              probe: Callable[..., dict], seed: int = 0) -> SuiteRun:
    """For each (spec, root): load splits, featurize each split, probe. `featurize(spec, root, role, ds)`
    returns extract()'s dict; `probe(train=, val=, test=, metric=, multilabel=)` returns run_probe()'s dict.
    Missing datasets and per-dataset failures are recorded; the loop always continues."""
    run = SuiteRun()
    for spec, root in entries:
        t0 = time.perf_counter()
        try:
            splits = load_splits(spec, root, seed)
            feats = {r: featurize(spec, root, r, ds) for r, ds in splits.items() if ds is not None}
            t1 = time.perf_counter()
            pair = {r: (f["features"], f["labels"]) for r, f in feats.items()}
            res = probe(train=pair["train"], val=pair.get("val"), test=pair["test"], metric=spec.metric,
                        multilabel=spec.multilabel)
            names = classnames_of(spec, splits["train"])
            # the probe returns fractions; the report holds percent, with the unit in the key
            res.update(status="ok", root=str(root), score_pct=100.0 * res.pop("score"),
                       val_score_pct=100.0 * res.pop("val_score"),
                       layout=getattr(splits["train"], "layout", "torchvision"),
                       num_classes=len(names) if names else None,
                       skipped_corrupt={r: f["skipped"] for r, f in feats.items()},
                       time_s={"features": t1 - t0, "probe": time.perf_counter() - t1})
            res["search"] = [{**{k: v for k, v in h.items() if k != "val"}, "val_pct": 100.0 * h["val"]}
                             for h in res.get("search", [])]
            run.results[spec.name] = res
            log.info("%s: %s %.2f %%", spec.name, spec.metric, res["score_pct"])
        except MissingDataset as e:  # only load_splits raises it
            log.warning("%s", e)
            run.results[spec.name] = {"status": "missing", "root": str(root), "expected_layout": e.expected_layout}
        except Exception as e:  # noqa: BLE001 - one broken dataset (bad CSV, broken shard, ...) must not stop the suite
            log.error("%s failed: %s", spec.name, e)
            run.results[spec.name] = {"status": "error", "root": str(root), "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc(limit=3)}
    return run


def limit_dataset(ds: Any, limit: int | None, seed: int = 0) -> Any:
    """A seeded random subset of at most `limit` samples (for quick runs)."""
    if limit is None or len(ds) <= limit:
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return torch.utils.data.Subset(ds, idx.tolist())


class CachedFeaturizer:
    """`featurize(spec, root, role, ds)` for run_suite: the shared image-feature loop over a split (limited
    to `limit` samples), cached on disk per (model name and config, checkpoint, dataset, split, root, `extra`)."""

    def __init__(self, encode: Callable, transform: Callable, device: torch.device, *, model_name: str,
                 checkpoint: str | None, cache_dir: str | Path | None, extra: dict, limit: int | None = None,
                 seed: int = 0, batch_size: int = 64, workers: int = 0, autocast: Callable | None = None,
                 progress: bool | None = None, report: Callable[[str], None] = log.info,
                 model_config: dict | None = None):
        self.encode, self.transform, self.device, self.model_config = encode, transform, device, model_config
        self.model_name, self.checkpoint, self.cache_dir, self.extra = model_name, checkpoint, cache_dir, extra
        self.limit, self.seed, self.batch_size, self.workers = limit, seed, batch_size, workers
        self.autocast, self.progress, self.report = autocast, progress, report

    def __call__(self, spec: DatasetSpec, root: Path, role: str, ds: Any) -> dict:
        from .features import SafeDataset, cache_key, cached, extract_image_features

        ds = limit_dataset(ds, self.limit, self.seed)
        key = cache_key(self.model_name, self.checkpoint, spec.name, role, str(root), self.extra, self.model_config)
        res, hit = cached(self.cache_dir, key, lambda: extract_image_features(
            self.encode, SafeDataset(ds, self.transform), self.device, batch_size=self.batch_size,
            workers=self.workers, autocast=self.autocast, progress=self.progress, desc=f"{spec.name}/{role}"))
        self.report(f"{spec.name}/{role}: {len(res['features'])} features ({'cache' if hit else 'extracted'})"
                    + (f", {res['skipped']} unreadable images skipped" if res["skipped"] else ""))
        return res
