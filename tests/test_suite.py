"""Suite registry, dataset layouts, the runner (missing datasets), corrupt images and the feature cache."""
import gzip
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from msclip.eval import suite as S
import msclip
from msclip.eval.features import SafeDataset, cache_key, cached, extract_image_features
from msclip.eval.linear_probe import run_probe

COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(img.resize((4, 4)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _encode(x: torch.Tensor) -> torch.Tensor:  # stands in for model.encode_image
    return x.mean(dim=(2, 3)) + 0.01 * torch.randn(x.shape[0], 3)


def _folder(root, split, n=6):
    for name, rgb in COLORS.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 6), rgb).save(root / split / name / f"{i}.png")


def test_registry_is_the_msclip24_suite():
    specs = S.SUITES["msclip24"]
    assert len(specs) == 24 and len({s.name for s in specs}) == 24
    metric = {s.name: s.metric for s in specs}
    assert {n for n, m in metric.items() if m == "mean_per_class"} == {"fgvc_aircraft", "pets", "caltech101",
                                                                      "flowers102"}
    assert metric["voc2007"] == "map11" and metric["hateful_memes"] == "roc_auc"
    assert S.get_spec("wds_vtab-cifar10").name == "cifar10"  # CLIP_benchmark folder names resolve
    assert S.get_spec("my_set").metric == "accuracy"  # unknown names: generic single-label entry
    assert S._voc_target({"annotation": {"object": [{"name": "cat", "difficult": "0"},
                                                    {"name": "dog", "difficult": "1"}]}})[7:12:4] == [1, -1]


def test_layouts_folder_csv_wds_idx_jsonl(tmp_path):
    _folder(tmp_path / "f", "train")
    _folder(tmp_path / "f", "test", 2)
    sp = S.load_splits(S.get_spec("f"), tmp_path / "f")
    assert len(sp["train"]) == 12 and sp["val"] is None and sp["train"].classnames == ["blue", "red"]

    (tmp_path / "c").mkdir()
    Image.new("RGB", (5, 5)).save(tmp_path / "c" / "x.png")
    for split in ("train", "test"):
        (tmp_path / "c" / f"{split}.csv").write_text("filepath,label\nx.png,3\nx.png,1\n")
    assert S.load_splits(S.get_spec("c"), tmp_path / "c")["test"][0][1] == 3

    for split in ("train", "test"):
        (tmp_path / "w" / split).mkdir(parents=True)
        with tarfile.open(tmp_path / "w" / split / "0.tar", "w") as tar:
            for key, payload in (("a.png", _png()), ("a.cls", b"1"), ("b.png", _png()), ("b.cls", b"0")):
                info = tarfile.TarInfo(key)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "w" / "classnames.txt").write_text("zero\none\n")
    sp = S.load_splits(S.get_spec("w"), tmp_path / "w")
    assert [sp["train"][i][1] for i in range(2)] == [1, 0] and sp["train"].classnames == ["zero", "one"]

    (tmp_path / "m").mkdir()
    for prefix, n in (("train", 5), ("t10k", 3)):
        with gzip.open(tmp_path / "m" / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28)) + bytes(n * 784))
        with gzip.open(tmp_path / "m" / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(range(n)))
    sp = S.load_splits(S.get_spec("fashion-mnist"), tmp_path / "m")
    assert (len(sp["train"]), len(sp["test"])) == (5, 3) and sp["test"][2][0].mode == "RGB"

    (tmp_path / "h" / "img").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(tmp_path / "h" / "img" / "1.png")
    (tmp_path / "h" / "train.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 1, "text": "hi"}\n')
    (tmp_path / "h" / "dev_seen.jsonl").write_text('{"id": 1, "img": "img/1.png", "label": 0}\n')
    sp = S.load_splits(S.get_spec("hateful_memes"), tmp_path / "h")
    assert sp["train"][0][1] == 1 and sp["test"][0][1] == 0


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_pool_dataset_is_split_per_class(tmp_path):
    _folder(tmp_path, "", 10)  # ROOT/<class>/<image>, no official split (like RESISC45)
    sp = S.load_splits(S.get_spec("resisc45"), tmp_path)
    assert (len(sp["train"]), len(sp["test"])) == (16, 4)
    assert not set(sp["train"].indices) & set(sp["test"].indices)


def test_missing_dataset_is_reported_and_the_suite_continues(tmp_path):
    _folder(tmp_path / "data" / "good", "train")
    _folder(tmp_path / "data" / "good", "test", 3)
    # a re-saved valid image (black would sit between the classes and make the score depend on the noise draws)
    Image.new("RGB", (6, 6), COLORS["red"]).save(tmp_path / "data" / "good" / "test" / "red" / "0.png")
    (tmp_path / "data" / "good" / "test" / "red" / "bad.png").write_bytes(b"not an image")
    _folder(tmp_path / "data" / "broken", "train")  # train but no test split: reported missing too
    entries = [(S.get_spec(n), S.find_root(S.get_spec(n), tmp_path / "data")) for n in ("good", "cifar10", "broken")]

    def featurize(spec, root, role, ds):
        return extract_image_features(_encode, SafeDataset(ds, _to_tensor), torch.device("cpu"), batch_size=4,
                                      progress=False)

    def probe(**kw):
        return run_probe(protocol="clip", **kw)

    run = S.run_suite(entries, featurize, probe)
    good = run.results["good"]
    assert good["status"] == "ok" and good["score_pct"] == pytest.approx(100.0)
    assert good["skipped_corrupt"] == {"train": 0, "test": 1} and good["n_test"] == 6
    assert "C" in good["hparam"] and good["num_classes"] == 2
    miss = run.results["cifar10"]
    assert miss["status"] == "missing" and "torchvision.datasets.CIFAR10" in miss["expected_layout"]
    assert run.results["broken"]["status"] == "missing"
    assert run.summary() == {"mean_pct": pytest.approx(100.0), "n_ok": 1, "n_missing": 2, "n_error": 0}


def test_feature_cache_is_reused_and_keyed_by_checkpoint(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"123")
    key = cache_key("clip-b32-tiny", str(ckpt), "good", "train", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"features": torch.ones(2, 3), "labels": torch.tensor([0, 1]), "skipped": 0}

    first, hit1 = cached(tmp_path / "cache", key, compute)
    second, hit2 = cached(tmp_path / "cache", key, compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert torch.equal(first["features"], second["features"])
    os.utime(ckpt, ns=(1, 1))  # a rewritten checkpoint gets a new key
    assert cache_key("clip-b32-tiny", str(ckpt), "good", "train", str(tmp_path)) != key
    assert cache_key("clip-b32-tiny", str(ckpt), "good", "test", str(tmp_path)) != key
    # a config file edited in place (same spec, same weights file): another key
    cfg = msclip.get_model_config("clip-b32-tiny").to_dict()
    edited = {**cfg, "embed_dim": cfg["embed_dim"] * 2}
    assert cache_key("m.json", str(ckpt), "good", "train", str(tmp_path), model_config=cfg) != \
        cache_key("m.json", str(ckpt), "good", "train", str(tmp_path), model_config=edited)
