"""An on-disk embedding index: L2-normalised image embeddings in FAISS plus the table of what each row is.

Layout of an index folder (every file written atomically with msclip.io):

* ``meta.json``: written last; names the files of the current generation, the model identity (config
  and checkpoint sha256), the image root, counts and the unreadable images;
* ``features-<gen>.npy``: float32 [N, E], unit rows (the source of truth; the FAISS index is built from it);
* ``items-<gen>.jsonl``: row i = {"id", "source", "stamp", "captions"} of feature row i;
* ``index-<gen>.faiss``: ``faiss.serialize_index`` of a flat inner-product index, or of an IVF one above
  the size threshold. Inner product of unit vectors is cosine similarity.

A re-run embeds only new or changed files (keyed by relative path + size + mtime); files that are gone drop
out. Each run writes a new generation and then meta.json, so an interrupted run leaves the previous index
intact (meta.json still names the old, complete files); files of other generations are removed afterwards.
One writer at a time per index folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msclip import io as mio
from msclip.factory import list_models
from msclip.errors import MissingFileError, MsclipError
from msclip.eval.features import SafeDataset, extract_image_features
from msclip.eval.imagefolder import load_rgb, scan_images
from msclip.eval.loading import eval_transform, file_sha256
from msclip.eval.retrieval import read_csv_pairs
from msclip.eval.suite_datasets import TarMember, find_shards, index_tar_shards, open_image, wds_image
from msclip.data.formats import wds_captions

log = logging.getLogger(__name__)
FORMAT = 1
META = "meta.json"
DEFAULT_IVF_THRESHOLD = 100_000  # below: exact flat search; above: IVF (approximate, much faster)
DEFAULT_NPROBE = 32
MIN_POINTS_PER_LIST = 39  # FAISS's own minimum of training points per IVF list


class IndexStoreError(MsclipError):
    """An index folder is unusable or inconsistent; the message names it."""


class ModelMismatchError(IndexStoreError):
    """The index was built with another model (config or weights) than the one given."""


# ------------------------------------------------------------------------- model identity
def model_identity(model_spec: str, model: Any, checkpoint: str, precision: str) -> dict[str, Any]:
    """What makes embeddings comparable: the config (hashed) and the exact weights (sha256)."""
    config = json.dumps(model.cfg.to_dict(), sort_keys=True)
    # a config file or a model folder, found again by `msclip search` from any folder; a registered name wins
    # over a file or folder of that name in the working directory, as it does in the factory
    if model_spec not in list_models() and os.path.exists(model_spec):
        model_spec = os.path.abspath(model_spec)
    return {"spec": model_spec, "name": model.cfg.name, "embed_dim": model.cfg.embed_dim,
            "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
            "checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
            "precision": precision}


def check_same_model(index_dir: str | os.PathLike, built: dict, given: dict) -> None:
    problems = [f"{what} {built[key][:12]} vs {given[key][:12]}" for key, what in
                (("config_sha256", "model config sha256"), ("checkpoint_sha256", "checkpoint sha256"))
                if built[key] != given[key]]
    if problems:
        raise ModelMismatchError(
            f"index {str(index_dir)!r} was built with model {built['spec']!r} (weights {built['checkpoint']!r}) "
            f"but this run uses {given['spec']!r} (weights {given['checkpoint']!r}): {'; '.join(problems)}. "
            "Embeddings of different models cannot be mixed: use another --output folder, or --rebuild")


# ------------------------------------------------------------------------- what is in the source
@dataclass
class Item:
    id: str  # path relative to the root, or "<shard>/<sample key>" for a WebDataset sample
    source: dict  # {"path": rel} or {"shard": rel, "offset": int, "size": int}
    stamp: list[int]  # [size, mtime_ns] of the file (of the shard for WebDataset samples)
    captions: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "stamp": self.stamp, "captions": self.captions}

    @classmethod
    def from_json(cls, d: dict) -> "Item":
        return cls(d["id"], d["source"], list(d["stamp"]), list(d.get("captions", [])))


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def source_kind(root: str | os.PathLike) -> str:
    """'wds' for a .tar file or a folder with .tar shards at its top level, else 'folder'."""
    return "wds" if find_shards(root) else "folder"


def scan_source(root: str | os.PathLike, old: dict[str, Item] | None = None) -> list[Item]:
    """Every image under ROOT (sorted) or every WebDataset sample with an image. Shards whose stamp is
    unchanged reuse the `old` items instead of being re-read."""
    root = str(root)
    if not os.path.exists(root):
        raise MissingFileError(f"--images {root!r} does not exist")
    if source_kind(root) == "folder":
        return [Item(os.path.relpath(p, root), {"path": os.path.relpath(p, root)}, _stamp(p))
                for p in scan_images(root)]
    base = root if os.path.isdir(root) else os.path.dirname(root)
    by_shard: dict[str, list[Item]] = {}
    for it in (old or {}).values():
        if "shard" in it.source:
            by_shard.setdefault(it.source["shard"], []).append(it)
    items: list[Item] = []
    for shard in find_shards(root):
        rel, stamp = os.path.relpath(shard, base), _stamp(shard)
        known = by_shard.get(rel, [])
        if known and all(it.stamp == stamp for it in known):
            items += known
            continue
        for s in index_tar_shards([shard]):
            img = wds_image(s)
            if img is not None:
                items.append(Item(f"{rel}/{s['__key__']}", {"shard": rel, "offset": img.offset, "size": img.size},
                                  stamp, wds_captions(s, one_per_line=True).texts))
    if not items:
        raise IndexStoreError(f"--images {root!r}: the shards hold no sample with an image")
    return items


def source_base(root: str | os.PathLike) -> str:
    """The folder item sources are relative to."""
    root = os.path.abspath(root)
    return root if os.path.isdir(root) else os.path.dirname(root)


def open_item(base: str, source: dict) -> Any:
    """PIL RGB image of an item (a file is read like every other folder image: truncated files load)."""
    if "path" in source:
        return load_rgb(os.path.join(base, source["path"]))
    return open_image(TarMember(os.path.join(base, source["shard"]), source["offset"], source["size"]))


class ItemImages(torch.utils.data.Dataset):
    """(PIL image, position) per item, for the shared image loop."""

    def __init__(self, base: str, items: list[Item]):
        self.base, self.items = base, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return open_item(self.base, self.items[i].source), i


def read_captions(csv_path: str, root: str) -> dict[str, list[str]]:
    """{relative image path: captions} from a CSV/TSV of (image, caption) rows relative to ROOT."""
    pairs = read_csv_pairs(csv_path, root)
    out: dict[str, list[str]] = {}
    for cap, owner in zip(pairs.captions, pairs.caption_image):
        out.setdefault(os.path.normpath(os.path.relpath(pairs.images[owner], root)), []).append(cap)
    return out


# ------------------------------------------------------------------------- the stored index
@dataclass
class IndexStore:
    path: Path
    meta: dict
    items: list[Item]
    features: np.ndarray  # float32 [N, E], unit rows
    index: Any  # faiss.Index over `features`

    @property
    def base(self) -> str:
        return self.meta["source_base"]

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], rows [Q, k']) by inner product = cosine, best first; k' = min(k, N)."""
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = min(nprobe or self.meta["nprobe"], self.index.nlist)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, min(k, len(self.items)))


def _file(path: Path, meta: dict, role: str) -> Path:
    name = meta.get("files", {}).get(role)
    if not name or not (path / name).is_file():
        raise IndexStoreError(f"index {str(path)!r}: the {role} file {name!r} named in {META} is missing; "
                              "rebuild it with `msclip index --rebuild`")
    return path / name


def _read_items(path: Path) -> list[Item]:
    with open(path, encoding="utf-8") as f:
        return [Item.from_json(json.loads(line)) for line in f if line.strip()]


def _read_part(path: Path, meta: dict, role: str, read: Any) -> Any:
    """`read(file)` of the index's `role` file; a damaged file (cut short, overwritten, not this format) is an
    IndexStoreError naming it, not the reader's own traceback."""
    file = _file(path, meta, role)
    try:
        return read(file)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError) as e:  # faiss raises RuntimeError
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise IndexStoreError(f"index {str(path)!r}: its {role} file {str(file)!r} is damaged ({detail}); "
                              "rebuild it with `msclip index --rebuild`") from None


def read_meta(path: str | os.PathLike) -> dict | None:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexStoreError(f"{meta_path}: unreadable ({e}); rebuild the index with --rebuild") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") != "msclip-index":
        raise IndexStoreError(f"{meta_path}: not an msclip index (format {FORMAT})")
    return meta


def load_index(path: str | os.PathLike) -> IndexStore:
    """Open an index folder; its files must agree with each other and with meta.json."""
    import faiss

    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise MissingFileError(f"index {str(path)!r} does not exist (no {META}); build it with `msclip index`")
    items = _read_part(path, meta, "items", _read_items)
    features = _read_part(path, meta, "features", lambda f: np.load(f, allow_pickle=False))
    index = _read_part(path, meta, "index", lambda f: faiss.deserialize_index(np.fromfile(f, dtype=np.uint8)))
    if features.ndim != 2:
        raise IndexStoreError(f"index {str(path)!r}: the features file holds a {features.ndim}-d array, not "
                              "[rows, dim]; rebuild it with `msclip index --rebuild`")
    counts = {"meta": meta.get("count"), "items": len(items), "features": features.shape[0], "faiss": index.ntotal}
    if len(set(counts.values())) != 1 or features.shape[1] != meta.get("dim") or index.d != meta.get("dim"):
        raise IndexStoreError(f"index {str(path)!r} is inconsistent (rows: {counts}; dim {meta.get('dim')}); "
                              "rebuild it with `msclip index --rebuild`")
    return IndexStore(path, meta, items, features, index)


def build_faiss(features: np.ndarray, ivf_threshold: int, nlist: int | None = None) -> tuple[Any, dict]:
    """Flat inner product below `ivf_threshold` rows, else IVF-flat (inner product) trained on the rows."""
    import faiss

    n, d = features.shape
    if n < ivf_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(features)
        return index, {"type": "flat"}
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))
    if nlist > n:
        raise IndexStoreError(f"--nlist {nlist} is larger than the {n} indexed images")
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(features)
    index.add(features)
    return index, {"type": "ivf", "nlist": nlist, "trained_on": n}


@dataclass
class UpdateReport:
    path: str
    count: int  # rows in the index now
    embedded: int  # images encoded in this run
    reused: int  # rows kept from the previous run
    removed: int  # rows dropped (file gone or changed)
    skipped: list[dict]  # every unreadable image: {id, error}
    skipped_new: int  # of those, found unreadable in this run
    index_type: str
    seconds: float = 0.0
    captions_unmatched: int = 0  # caption rows whose image is not in the source


def update_index(output: str | os.PathLike, root: str | os.PathLike, model: Any, identity: dict,
                 device: torch.device | str, *, captions_csv: str | None = None, rebuild: bool = False,
                 ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nlist: int | None = None,
                 nprobe: int = DEFAULT_NPROBE, batch_size: int = 64, workers: int = 0,
                 progress: bool | None = None) -> UpdateReport:
    """Create or update the index at `output` from the images under `root` (see the module doc)."""
    output, base = Path(output), source_base(root)
    t0 = time.perf_counter()
    gen = _last_generation(output) + 1  # also with --rebuild: never overwrite the files meta.json names
    meta = None if rebuild else read_meta(output)
    old: IndexStore | None = None
    if meta is not None:
        check_same_model(output, meta["model"], identity)
        old = load_index(output)
    old_rows = {it.id: (r, it) for r, it in enumerate(old.items)} if old else {}
    old_skipped = {s["id"]: s for s in meta.get("skipped", [])} if meta else {}
    if old and old.base != base:
        log.warning("index %s was built from %s; now reading %s (paths are matched relative to it)",
                    output, old.base, base)
    known = {i: it for i, (_, it) in old_rows.items()}
    known.update({i: Item(i, d["source"], d["stamp"]) for i, d in old_skipped.items() if "source" in d})
    items = scan_source(root, known)
    if captions_csv is not None:
        table = read_captions(captions_csv, base)
        unmatched = len(set(table) - {os.path.normpath(it.id) for it in items})
        for it in items:
            it.captions = table.get(os.path.normpath(it.id), [])
    else:
        unmatched = 0
        for it in items:  # keep the captions a previous run read from a CSV (stored with a row or a skip)
            if not it.captions and it.id in old_rows and "path" in it.source:
                it.captions = old_rows[it.id][1].captions
            elif not it.captions and it.id in old_skipped:
                it.captions = list(old_skipped[it.id].get("captions", []))
    keep, new, skipped = _plan(items, old_rows, old_skipped)
    dataset = SafeDataset(ItemImages(base, new), eval_transform(model))
    feats = extract_image_features(lambda x: model.encode_image(x, normalize=True), dataset, device,
                                   batch_size=batch_size, workers=workers, progress=progress,
                                   desc="index images", allow_empty=True) if new else None
    embedded: list[Item] = []
    new_feats = np.zeros((0, identity["embed_dim"]), dtype=np.float32)
    if feats is not None:
        embedded = [new[i] for i in feats["indices"].tolist()]
        if embedded:
            new_feats = F.normalize(feats["features"].float(), dim=-1).numpy()
        skipped += [{"id": new[i].id, "source": new[i].source, "stamp": new[i].stamp, "error": err,
                     **_captions_entry(new[i])} for i, err in feats["failures"]]
    skipped_new = len(feats["failures"]) if feats is not None else 0
    rows = [it for _, it in keep] + embedded
    if not rows:
        raise IndexStoreError(f"--images {str(root)!r}: no image could be read ({len(skipped)} unreadable; first: "
                              f"{skipped[0]['id']}: {skipped[0]['error']})" if skipped else "no images")
    kept_feats = old.features[[r for r, _ in keep]] if keep else new_feats[:0]
    features = np.ascontiguousarray(np.concatenate([kept_feats, new_feats]), dtype=np.float32)
    index, index_info = _next_faiss(old, meta, keep, features, new_feats, ivf_threshold, nlist)
    removed = len(old_rows) - len(keep)
    files = {"features": f"features-{gen:06d}.npy", "items": f"items-{gen:06d}.jsonl",
             "index": f"index-{gen:06d}.faiss"}
    import faiss

    mio.numpy_save(output / files["features"], features)
    mio.write_text(output / files["items"], "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n"
                                                    for it in rows))
    mio.write_bytes(output / files["index"], faiss.serialize_index(index).tobytes())
    new_meta = {"kind": "msclip-index", "format": FORMAT, "generation": gen, "files": files,
                "model": identity, "source": str(root), "source_base": base, "source_kind": source_kind(root),
                "count": len(rows), "dim": int(features.shape[1]), "normalized": "L2", "metric": "inner_product",
                "index": index_info, "nprobe": nprobe, "captioned": sum(bool(it.captions) for it in rows),
                "skipped_count": len(skipped), "skipped": skipped}
    mio.write_json(output / META, new_meta)
    _remove_other_generations(output, files)
    return UpdateReport(str(output), len(rows), len(embedded), len(keep), removed, skipped, skipped_new,
                        index_info["type"], time.perf_counter() - t0, unmatched)


def _captions_entry(it: Item) -> dict[str, list[str]]:
    # a skipped image keeps its CSV captions, for when it becomes readable in a run without --captions
    return {"captions": list(it.captions)} if it.captions else {}


def _plan(items: list[Item], old_rows: dict[str, tuple[int, Item]], old_skipped: dict[str, dict]
          ) -> tuple[list[tuple[int, Item]], list[Item], list[dict]]:
    """(rows to keep as (old row, item) in the old order, items to embed, unreadable items not retried)."""
    keep, new, skipped = [], [], []
    for it in items:
        prev = old_rows.get(it.id)
        if prev is not None and prev[1].stamp == it.stamp:
            keep.append((prev[0], it))
        elif it.id in old_skipped and old_skipped[it.id]["stamp"] == it.stamp:
            # unchanged and unreadable last time: not retried; its captions are this run's
            skipped.append({**old_skipped[it.id], **_captions_entry(it)})
        else:
            new.append(it)
    keep.sort(key=lambda rk: rk[0])  # old order, so an unchanged index keeps its row numbers
    return keep, new, skipped


def _next_faiss(old: IndexStore | None, meta: dict | None, keep: list, features: np.ndarray,
                new_feats: np.ndarray, ivf_threshold: int, nlist: int | None) -> tuple[Any, dict]:
    """Reuse a trained IVF index when rows were only appended and it is not outgrown (retraining k-means on
    every run would cost more than the new embeddings); otherwise build afresh."""
    info = meta["index"] if meta else None
    appended_only = old is not None and [r for r, _ in keep] == list(range(len(old.items)))
    if (appended_only and info and info["type"] == "ivf" and nlist in (None, info["nlist"])
            and features.shape[0] <= 4 * info["trained_on"] and features.shape[0] >= ivf_threshold):
        old.index.add(np.ascontiguousarray(new_feats))
        return old.index, info
    return build_faiss(features, ivf_threshold, nlist)


def _last_generation(output: Path) -> int:
    """The highest generation number of any index file in `output` (0 for none)."""
    gens = [int(p.stem.rsplit("-", 1)[1]) for p in output.glob("*-[0-9]*.*")
            if p.stem.rsplit("-", 1)[1].isdigit()] if output.is_dir() else []
    return max(gens, default=0)


def _remove_other_generations(output: Path, files: dict[str, str]) -> None:
    current = set(files.values())
    for p in output.iterdir():
        if p.is_file() and p.name not in current and p.name.split("-")[0] in files and \
                p.suffix in (".npy", ".jsonl", ".faiss"):
            p.unlink(missing_ok=True)
    mio.remove_stale_temporaries(output)
