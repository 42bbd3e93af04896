"""Retrieval: chunked recall@k equals a brute-force computation; annotation readers."""
import csv
import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from msclip.eval.retrieval import ImageSource, read_annotations, recall_at_k


def brute_force(img, txt, owner, k):
    sims = img @ txt.T
    i2t = sum(any(owner[j] == i for j in sims[i].argsort(descending=True)[:k].tolist())
              for i in range(len(img))) / len(img)
    t2i = sum(owner[j] in sims[:, j].argsort(descending=True)[:k].tolist() for j in range(len(txt))) / len(txt)
    return i2t, t2i


@pytest.mark.parametrize("chunk", [3, 1000])
def test_recall_matches_brute_force_with_several_captions(chunk):
    g = torch.Generator().manual_seed(0)
    n_img, per = 20, [5, 3, 1] * 6 + [2, 4]  # uneven number of captions per image
    owner = torch.tensor([i for i, n in enumerate(per) for _ in range(n)])
    img = F.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 16, generator=g), dim=-1)
    out = recall_at_k(img, txt, owner, ks=(1, 5, 10), chunk=chunk)
    for k in (1, 5, 10):
        i2t, t2i = brute_force(img, txt, owner.tolist(), k)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert out[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    assert 0 < out["text_to_image_R@1"] < 1  # the noise makes the test non-trivial


def test_perfect_embeddings_give_recall_one():
    owner = torch.tensor([0, 0, 1, 1, 2])
    img = torch.eye(3)
    out = recall_at_k(img, img[owner], owner, ks=(1,))
    assert out["image_to_text_R@1"] == out["text_to_image_R@1"] == 1.0


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_readers_karpathy_csv_wds(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    karpathy = {"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "a red square"}, {"raw": "red"}]},
        {"filename": "b.png", "split": "test", "sentences": [{"raw": "another one"}]},
        {"filename": "c.png", "split": "train", "sentences": [{"raw": "not in test"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    rs = read_annotations(str(tmp_path / "k.json"), str(tmp_path))
    assert rs.captions == ["a red square", "red", "another one"] and rs.caption_image == [0, 0, 1]
    assert ImageSource(rs.images)[1][0].size == (8, 8)

    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["image", "caption"], ["a.png", "one"], ["b.png", "two"], ["a.png", "three"]])
    rs = read_annotations(str(tmp_path / "pairs.csv"))
    assert rs.caption_image == [0, 1, 0] and len(rs.images) == 2

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "0.tar", "w") as tar:
        _add(tar, "s0.png", _png_bytes("blue"))
        _add(tar, "s0.txt", b"a blue square\nblue")
        _add(tar, "s1.jpg", _png_bytes("green"))  # content is PNG: PIL sniffs the format
        _add(tar, "s1.json", json.dumps({"captions": ["green"]}).encode())
        _add(tar, "s2.txt", b"caption without image")
    rs = read_annotations(str(shards))
    assert rs.captions == ["a blue square", "blue", "green"] and rs.caption_image == [0, 0, 1]
    assert ImageSource(rs.images)[0][0].getpixel((0, 0)) == (0, 0, 255)


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_annotations(str(tmp_path / "nope.json"), str(tmp_path))
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "a", "split": "train",
                                                             "sentences": [{"raw": "x"}]}]}))
    with pytest.raises(ValueError, match="k.json.*split 'test'"):
        read_annotations(str(tmp_path / "k.json"), str(tmp_path))


def test_gallery_rows_pick_worst_and_best_captions():
    from msclip.index.gallery import render_gallery, retrieval_rows

    images = torch.eye(4)
    # caption -> own image: 0 -> 0 at rank 1 (margin 0.8), 1 -> 1 at rank 3, 2 -> 2 at rank 1 (margin 0.2),
    # 3 -> 3 at rank 4
    texts = F.normalize(torch.tensor([[1.0, 0.2, 0.1, 0], [0.5, 0.3, 0.6, 0], [0, 0.4, 0.6, 0],
                                      [0.5, 0.4, 0.3, 0.1]]), dim=-1)
    opened = []
    rows = retrieval_rows(images, texts, torch.arange(4), ["c0", "c1", "c2", "c3"], [f"i{i}.png" for i in range(4)],
                          lambda i: opened.append(i) or Image.new("RGB", (8, 8), "red"), worst=2, best=1, k=3)
    assert [(r.label, r.extra["group"], r.extra["rank"]) for r in rows] == \
        [("c3", "worst", 4), ("c1", "worst", 3), ("c0", "best", 1)]
    assert [c.title for c in rows[2].cells] == ["i0.png", "i1.png", "i2.png"] and rows[2].cells[0].mark
    assert not any(c.mark for c in rows[0].cells)  # own image outside the top 3
    page = render_gallery(rows, "t")
    assert page.count('<div class="row">') == 3 and page.count('class="cell mark"') == 2
    assert page.count("data:image/jpeg;base64,") == 9 and len(opened) == 9


def test_retrieval_html_leaves_the_results_unchanged(tmp_path, one_thread):
    from msclip.commands import retrieval as retrieval_cmd

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for c in colours:
            Image.new("RGB", (16, 16), c).save(tmp_path / f"{c}.png")
            w.writerows([[f"{c}.png", f"a {c} square"], [f"{c}.png", c]])
    base = ["--model", "clip-b32-tiny", "--annotations", str(tmp_path / "pairs.csv"), "--device", "cpu",
            "--workers", "0", "--no-progress"]
    assert retrieval_cmd.main(base + ["--output", str(tmp_path / "a.json")]) == 0
    torch.manual_seed(0)  # random weights: the same ones for both runs
    assert retrieval_cmd.main(base + ["--output", str(tmp_path / "b.json"), "--html", str(tmp_path / "g.html"),
                                      "--html-queries", "2", "--html-k", "3"]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"]
    page = (tmp_path / "g.html").read_text()
    assert page.count('<div class="row">') == 4 and page.count('<div class="score">') == 12
    assert page.count("worst: own image at rank") == 2 and page.count("best: own image at rank") == 2


def test_blip_lavis_record_lists_are_read_and_bad_json_names_the_file(tmp_path):
    """The BLIP / LAVIS annotation list (coco_karpathy_test.json: {"image", "caption": str or list} records) is
    read with one row per image in first-seen order and blank captions dropped; a JSON of neither layout, or a
    malformed record, is an AnnotationError naming the file (and the record), never a TypeError."""
    from msclip.eval.retrieval import AnnotationError, read_annotations

    ann = tmp_path / "coco_karpathy_test.json"
    ann.write_text(json.dumps([{"image": "val/a.jpg", "caption": ["a cat", "  "]}, {"image": "val/b.jpg",
                               "caption": "a dog"}, {"image": "val/a.jpg", "caption": "a small cat"}]))
    rs = read_annotations(str(ann), str(tmp_path))
    assert rs.images == [str(tmp_path / "val/a.jpg"), str(tmp_path / "val/b.jpg")]
    assert rs.captions == ["a cat", "a dog", "a small cat"] and rs.caption_image == [0, 1, 0]
    for bad, where in (({"images": 3}, "neither a Karpathy-split file"), ([{"file": "c.jpg"}], r"record \[0\]"),
                       ({"images": [{"split": "test"}]}, r"images\[0\] has no 'filename'")):
        ann.write_text(json.dumps(bad))
        with pytest.raises(AnnotationError, match=rf"{ann.name}: .*{where}|{ann.name}: {where}"):
            read_annotations(str(ann), str(tmp_path))
