"""Training data sources: exact epochs across workers, skip-and-count, resampling, clear errors."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from shard_utils import write_tar
from byte_tokenizer import CTX, byte_tokenize as stub_tokenizer, decode
from msclip.data import COUNT_FIELDS, DataSpec, build_train_data
from msclip.data import fashion_mnist as fm

TRANSFORM = T.Compose([T.Resize((16, 16)), T.ToTensor()])


def image_bytes(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), ((seed * 37) % 256, 80, 160)).save(buf, format=fmt)
    return buf.getvalue()


def clean_shards(root: Path, n_shards: int = 4, per_shard: int = 6) -> set[str]:
    """img2dataset-like shards mixing jpg/png/webp and txt/json captions; returns all captions."""
    caps = set()
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, cap = f"{s:03d}{i:04d}", f"s{s} i{i}"
            ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][i % 3]
            members.append((f"{key}.{ext}", image_bytes(fmt, i)))
            if i % 2:
                field = "caption" if i % 4 == 1 else "text"
                members.append((f"{key}.json", json.dumps({field: cap, "url": "x"}).encode()))
            else:
                members.append((f"{key}.txt", cap.encode()))
            caps.add(cap)
        write_tar(root / f"shard-{s:03d}.tar", members)
    return caps


def epoch_captions(info, epoch: int) -> list[str]:
    info.set_epoch(epoch)
    caps: list[str] = []
    for images, tokens in info.loader:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        assert tokens.dtype == torch.long and tokens.shape[1] == CTX
        caps += decode(tokens)
    return caps


def build(spec: DataSpec, **kw):
    args = dict(image_transform=TRANSFORM, tokenizer=stub_tokenizer, batch_size=3, workers=2)
    args.update(kw)
    return build_train_data(spec, **args)


def test_webdataset_every_sample_once_per_epoch_two_workers(tmp_path: Path) -> None:
    caps = clean_shards(tmp_path)
    # brace pattern and '::' join; sample count read from the tar headers
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{000..001}}.tar::{tmp_path}/shard-{{002..003}}.tar")
    info = build(spec)
    assert (info.num_samples, info.num_batches, len(info.loader)) == (24, 8, 8)
    orders = []
    for epoch in (0, 1):
        got = epoch_captions(info, epoch)
        assert Counter(got) == Counter(caps), f"epoch {epoch}: not every sample exactly once"
        orders.append(got)
    assert orders[0] != orders[1]  # shards and samples reshuffled per epoch
    assert info.stats.as_dict() == {"seen": 48, **dict.fromkeys(COUNT_FIELDS, 0)}


def test_webdataset_ranks_partition_the_shards(tmp_path: Path) -> None:
    caps = clean_shards(tmp_path)
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{000..003}}.tar")
    for epoch in (0, 1):  # shard order changes per epoch, identically on every rank
        per_rank = [epoch_captions(build(spec, workers=1, rank=r, world_size=2, epoch=epoch), epoch)
                    for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 12
        assert Counter(per_rank[0] + per_rank[1]) == Counter(caps)


def test_webdataset_corrupt_and_captionless_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = set()
    for s in range(2):  # one shard per worker: counts must cross the worker processes
        members = []
        for i, kind in enumerate(["ok", "corrupt", "ok", "nocap", "ok", "badjson", "ok"]):
            key = f"{s}{i:03d}"
            img = b"\xff\xd8 this is not a jpeg" if kind == "corrupt" else image_bytes("PNG", i)
            members.append((f"{key}.{'jpg' if kind == 'corrupt' else 'png'}", img))
            if kind == "badjson":
                members.append((f"{key}.json", b'{"url": "no caption field"}'))
            elif kind != "nocap":
                members.append((f"{key}.txt", f"s{s} i{i}".encode()))
            if kind == "ok":
                good.add(f"s{s} i{i}")
        write_tar(tmp_path / f"bad-{s}.tar", members)
    spec = DataSpec("webdataset", path=f"{tmp_path}/bad-{{0..1}}.tar", num_samples=8, shuffle_buffer=0)
    info = build(spec, batch_size=2)
    got = epoch_captions(info, 0)
    assert sorted(got) == sorted(good)
    assert info.stats.as_dict() == {**dict.fromkeys(COUNT_FIELDS, 0), "seen": 8, "skipped_decode": 2,
                                    "missing_caption": 4}


def test_webdataset_resampled_virtual_epoch(tmp_path: Path) -> None:
    caps = clean_shards(tmp_path, n_shards=2)
    spec = DataSpec("webdataset", path=f"{tmp_path}/shard-{{000..001}}.tar", num_samples=20, resampled=True)
    info = build(spec, batch_size=2)
    assert (info.num_samples, info.num_batches) == (20, 10)
    for epoch in (0, 1):
        got = epoch_captions(info, epoch)
        assert len(got) == 20 and set(got) <= caps
    assert info.stats.seen == 40


def test_webdataset_pipe_urls(tmp_path: Path) -> None:
    caps = clean_shards(tmp_path, n_shards=2)
    path = "::".join(f"pipe:cat {tmp_path}/shard-{s:03d}.tar" for s in range(2))
    with pytest.raises(ValueError, match="num_samples is required"):
        build(DataSpec("webdataset", path=path), workers=0)
    info = build(DataSpec("webdataset", path=path, num_samples=12), workers=0)
    assert Counter(epoch_captions(info, 0)) == Counter(caps)


def write_csv(root: Path, rows: list[tuple[str, str]], name: str = "pairs.tsv", sep: str = "\t") -> Path:
    (root / "img").mkdir(exist_ok=True)
    lines = [f"filepath{sep}title"]
    for i, (kind, cap) in enumerate(rows):
        rel = f"img/{i}.png"
        data = b"garbage" if kind == "corrupt" else image_bytes("PNG", i)
        (root / rel).write_bytes(data)
        lines.append(f"{rel}{sep}{cap}")
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_every_sample_once_per_epoch_two_workers(tmp_path: Path) -> None:
    rows = [("ok", f"caption {i}") for i in range(12)]
    info = build(DataSpec("csv", path=str(write_csv(tmp_path, rows))))  # .tsv -> tab separator
    assert (info.num_samples, info.num_batches) == (12, 4)
    for epoch in (0, 1):
        assert Counter(epoch_captions(info, epoch)) == Counter(c for _, c in rows)
    assert info.stats.as_dict()["seen"] == 24


def test_csv_ranks_partition_the_rows(tmp_path: Path) -> None:
    rows = [("ok", f"caption {i}") for i in range(12)]
    spec = DataSpec("csv", path=str(write_csv(tmp_path, rows, "pairs.csv", ",")))
    per_rank = [epoch_captions(build(spec, workers=0, rank=r, world_size=2, batch_size=2), 0) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    assert Counter(per_rank[0] + per_rank[1]) == Counter(c for _, c in rows)


def test_csv_corrupt_image_and_empty_caption_counted(tmp_path: Path) -> None:
    rows = [("ok", "a"), ("corrupt", "b"), ("ok", "c"), ("ok", "d"), ("ok", ""), ("ok", "f"), ("ok", "g"),
            ("ok", "h")]
    info = build(DataSpec("csv", path=str(write_csv(tmp_path, rows))), batch_size=2)
    got = epoch_captions(info, 0)
    assert len(got) == 8 and set(got) <= {"a", "c", "d", "f", "g", "h"}  # slots refilled by the next row
    assert {"b", ""}.isdisjoint(got)
    stats = info.stats.as_dict()
    assert (stats["seen"], stats["skipped_decode"], stats["empty_caption"], stats["shortfall"]) == (8, 1, 1, 2)


def test_missing_inputs_raise_clear_errors(tmp_path: Path) -> None:
    clean_shards(tmp_path, n_shards=1)
    missing = tmp_path / "shard-001.tar"
    with pytest.raises(FileNotFoundError, match="shard-001.tar"):
        build(DataSpec("webdataset", path=f"{tmp_path}/shard-{{000..001}}.tar"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build(DataSpec("csv", path=str(tmp_path / "nope.csv")))
    with pytest.raises(ValueError, match="unknown"):
        build(DataSpec("parquet", path=str(missing)))
    with pytest.raises(ValueError, match="num_samples"):
        build(DataSpec("webdataset", path=f"{tmp_path}/shard-000.tar", resampled=True))
    with pytest.raises(ValueError, match="1 shard"):  # 1 shard cannot feed 2 workers
        build(DataSpec("webdataset", path=f"{tmp_path}/shard-000.tar"))
    csv_path = write_csv(tmp_path, [("ok", "x")] * 4, "pairs.csv", ",")
    with pytest.raises(ValueError, match="'caption'"):
        build(DataSpec("csv", path=str(csv_path), csv_caption_key="caption"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist("test", root=tmp_path)


def test_synthetic_source() -> None:
    info = build(DataSpec("synthetic", num_samples=12), workers=0, batch_size=4)
    caps = epoch_captions(info, 0)
    assert len(caps) == 12 and all(c.startswith("a photo of a ") for c in caps)


def test_captions_are_the_zero_shot_prompts() -> None:
    # captions are filled exactly as zero-shot prompts are, so the demo's prompts are its training captions
    from msclip.eval.templates import fill_template

    assert len(fm.DEFAULT_CAPTION_TEMPLATES) >= 8
    labels = np.arange(10).repeat(5)
    ds = fm.FashionMNISTCaptions(np.zeros((50, 28, 28), np.uint8), labels, transform=lambda im: im)
    for i in range(50):
        name = fm.FASHION_MNIST_CAPTION_NAMES[int(labels[i])]
        assert ds.caption(i, 0) in [fill_template(t, name) for t in fm.DEFAULT_CAPTION_TEMPLATES]
    assert len(fm.FASHION_MNIST_CLASSNAMES) == len(fm.FASHION_MNIST_CAPTION_NAMES) == 10


@pytest.mark.skipif(not fm.fashion_mnist_available(),
                    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_loader_and_captions() -> None:
    images, labels = fm.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype.name == "uint8"
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    assert (labels == 0).sum() == 1000
    ds = fm.FashionMNISTCaptions(images[:64], labels[:64], TRANSFORM, seed=0)
    first = [ds.caption(i, 0) for i in range(64)]
    assert first == [ds.caption(i, 0) for i in range(64)]  # deterministic per epoch
    assert first != [ds.caption(i, 1) for i in range(64)]  # re-drawn each epoch
    assert len(set(first)) > 10
    assert all(fm.FASHION_MNIST_CAPTION_NAMES[l] in c for l, c in zip(labels[:64], first))
    info = build(DataSpec("fashion_mnist", split="test"), workers=0, batch_size=8)
    assert info.num_batches == 1250
    images_b, tokens_b = next(iter(info.loader))
    assert images_b.shape == (8, 3, 16, 16) and info.stats.seen == 8


def test_with_core_tokenizer_transform_and_loss() -> None:
    msclip = pytest.importorskip("msclip", reason="core model library not importable")
    from msclip.loss import ClipLoss

    model, train_tf, _ = msclip.create_model_and_transforms("clip-b32-tiny")
    tok = msclip.get_tokenizer("clip-b32-tiny")
    info = build_train_data(DataSpec("synthetic", num_samples=8), image_transform=train_tf, tokenizer=tok,
                            batch_size=8, workers=0)
    images, tokens = next(iter(info.loader))
    assert images.shape == (8, 3, 64, 64) and tokens.shape == (8, tok.context_length)
    out = model.train()(images, tokens)
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    assert torch.isfinite(loss)


def test_a_byte_order_mark_is_not_part_of_the_first_name_caption_or_column(tmp_path: Path) -> None:
    """Text files saved by Windows editors start with a UTF-8 BOM: it must not stick to the first class name,
    template, CSV column or caption, nor break a JSON model config."""
    import json

    from msclip.config import ModelCfg
    from msclip.data.formats import read_list_file, wds_captions
    from msclip.data.mapstyle import CsvCaptions
    from msclip.factory import create_model

    bom = "\ufeff"
    (tmp_path / "classes.txt").write_text(bom + "airplane\ncar\n", encoding="utf-8")
    assert read_list_file(tmp_path / "classes.txt", "class-name file") == ["airplane", "car"]
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "train.csv").write_text(bom + "filepath,title\na.png,a photo\n", encoding="utf-8")
    assert CsvCaptions(str(tmp_path / "train.csv"), transform=lambda x: x).captions == ["a photo"]
    assert wds_captions({"txt": (bom + "a cat").encode()}).texts == ["a cat"]
    assert wds_captions({"json": (bom + json.dumps({"caption": "a dog"})).encode()}).texts == ["a dog"]
    cfg = create_model("clip-b32-tiny").cfg.to_dict()
    (tmp_path / "model.json").write_text(bom + json.dumps(cfg), encoding="utf-8")
    assert {**ModelCfg.from_json(tmp_path / "model.json").to_dict(), "name": cfg["name"]} == cfg
