"""`msclip index` / `msclip search`: an embedding index of rendered emoji.

Built twice -> identical neighbours; re-runs embed only new or changed files; the text->image R@1 of the stored
captions equals `msclip retrieval`'s on the same model and data (an informative model: projections fitted to
the emoji); unreadable images are skipped and counted; another model is refused; the gallery has one row per
query with k scored images; IVF with every list probed equals flat; WebDataset shards; interrupted writes."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import msclip
from msclip.commands import index as index_cmd
from msclip.commands import search as search_cmd
from msclip.eval.retrieval import evaluate_retrieval, read_annotations
from msclip.index import store as store_mod
from msclip.index.search import caption_recall, embed_text_queries, index_model, search
from msclip.index.store import ModelMismatchError, load_index, model_identity, update_index
from shard_utils import write_tar

MODEL = "clip-b32-tiny"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds sync overhead
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")  # Debian fonts-noto-color-emoji
# file stem -> (emoji, trained caption, second caption never seen in the fit)
EMOJI = {
    "apple": ("\U0001F34E", "a red apple", "an apple"), "banana": ("\U0001F34C", "a yellow banana", "a banana"),
    "grapes": ("\U0001F347", "purple grapes", "some grapes"), "melon": ("\U0001F349", "a watermelon slice", "melon"),
    "car": ("\U0001F697", "a red car", "a car"), "bus": ("\U0001F68C", "a bus", "a city bus"),
    "bike": ("\U0001F6B2", "a bicycle", "a bike"), "rocket": ("\U0001F680", "a rocket", "a space rocket"),
    "cat": ("\U0001F431", "a cat face", "a cat"), "dog": ("\U0001F436", "a dog face", "a dog"),
    "fish": ("\U0001F41F", "a blue fish", "a fish"), "frog": ("\U0001F438", "a green frog", "a frog"),
    "sun": ("\U0001F31E", "a smiling sun", "the sun"), "moon": ("\U0001F319", "a crescent moon", "the moon"),
    "star": ("\u2B50", "a yellow star", "a star"), "tree": ("\U0001F333", "a green tree", "a tree"),
    "flower": ("\U0001F338", "a pink flower", "a blossom"), "house": ("\U0001F3E0", "a house", "a home"),
    "heart": ("\U0001F499", "a blue heart", "a heart"), "ball": ("\u26BD", "a football", "a soccer ball"),
    "guitar": ("\U0001F3B8", "a guitar", "an electric guitar"), "clock": ("\u23F0", "an alarm clock", "a clock"),
    "key": ("\U0001F511", "a golden key", "a key"), "pizza": ("\U0001F355", "a slice of pizza", "pizza"),
}


def render_emoji(char: str, size: int = 48) -> Image.Image:
    """The emoji on white; without the colour-emoji font, a coloured letter (still distinct per emoji)."""
    if EMOJI_FONT.is_file():
        font = ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size of this bitmap font
        img = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
    else:
        code = ord(char)
        img = Image.new("RGB", (128, 128), ((code * 37) % 256, (code * 91) % 256, (code * 53) % 256))
        ImageDraw.Draw(img).text((40, 40), chr(65 + code % 26), fill="white", font_size=60)
    return img.resize((size, size), Image.Resampling.BICUBIC)


def write_emoji(folder: Path, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(EMOJI):
        path = folder / f"{name}.png"
        render_emoji(EMOJI[name][0]).save(path)
        paths.append(path)
    return paths


def write_captions(path: Path, names: list[str] | None = None, both: bool = True) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in names or list(EMOJI):
            for cap in EMOJI[name][1:] if both else EMOJI[name][1:2]:
                w.writerow([f"{name}.png", cap])
    return path


def fit_projections(model: torch.nn.Module, steps: int = 150, lr: float = 0.02) -> torch.nn.Module:
    """Fit only the two projections of a random `model` to the emoji / first-caption pairs (contrastive loss on
    frozen tower features: milliseconds per step, so a test can afford an informative model)."""
    import msclip
    from msclip.transforms import image_transform

    tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)
    names = list(EMOJI)
    with torch.no_grad():
        x = model.encode_image(torch.stack([tf(render_emoji(EMOJI[n][0])) for n in names]), project=False)
        t = model.encode_text(msclip.get_tokenizer(model.cfg)([EMOJI[n][1] for n in names]))  # [N, E]
    g = torch.Generator().manual_seed(0)
    p_img = torch.nn.Parameter(model.image.proj.detach().clone())
    w_txt = torch.nn.Parameter(torch.eye(t.shape[1]) + 0.01 * torch.randn(t.shape[1], t.shape[1], generator=g))
    opt = torch.optim.Adam([p_img, w_txt], lr=lr)
    labels = torch.arange(len(names))
    for _ in range(steps):
        logits = 10 * F.normalize(x @ p_img, dim=-1) @ F.normalize(t @ w_txt, dim=-1).T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.image.proj.copy_(p_img)
        model.text.proj.copy_(model.text.proj @ w_txt)
    return model


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """images/ (24 emoji), captions.csv (two captions each: the fitted one and an unseen one), the fitted
    weights and a second, random set of weights for the same config."""
    root = tmp_path_factory.mktemp("emoji")
    write_emoji(root / "images")
    write_captions(root / "captions.csv")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured ~20x faster than two threads for this fit
    try:
        torch.manual_seed(0)
        msclip.save_pretrained(fit_projections(msclip.create_model(MODEL).eval()), root / "fitted.safetensors")
        torch.manual_seed(1)
        msclip.save_pretrained(msclip.create_model(MODEL), root / "other.safetensors")
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def model(assets):
    return msclip.create_model(MODEL, pretrained=str(assets / "fitted.safetensors")).eval()


def _update(out, images, model, assets, **kw):
    ident = model_identity(MODEL, model, str(assets / "fitted.safetensors"), "fp32")
    return update_index(out, images, model, ident, "cpu", batch_size=8, progress=False, **kw)


def _index_cli(*args):
    return index_cmd.main(["--model", MODEL, "--workers", "0", "--no-progress", "--device", "cpu", *map(str, args)])


def _neighbours(path, model, k=5):
    store = load_index(path)
    res = search(store, embed_text_queries(model, QUERIES, "cpu"), [(q, "text") for q in QUERIES], k)
    return [[(h.id, round(h.score, 5)) for h in r.hits] for r in res]


QUERIES = ["a red car", "a green frog", "a slice of pizza"]


# ------------------------------------------------------------------------- tests
def test_built_twice_identical_and_incremental_embeds_only_new_files(assets, model, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(assets / "images", images)
    first = _update(tmp_path / "a", images, model, assets)
    again = _update(tmp_path / "b", images, model, assets)
    assert first.embedded == again.embedded == 24 and first.index_type == "flat"
    assert _neighbours(tmp_path / "a", model) == _neighbours(tmp_path / "b", model)
    top = _neighbours(tmp_path / "a", model, k=1)
    assert [t[0][0] for t in top] == ["car.png", "frog.png", "pizza.png"]  # the fitted model is informative

    rerun = _update(tmp_path / "a", images, model, assets)  # nothing changed: nothing embedded
    assert (rerun.embedded, rerun.reused, rerun.removed, rerun.count) == (0, 24, 0, 24)
    (images / "sub").mkdir()
    write_emoji(images / "sub", ["cat", "dog"])  # 2 new files (nested)
    os.remove(images / "bus.png")  # 1 gone
    render_emoji(EMOJI["apple"][0]).rotate(90).save(images / "moon.png")  # 1 changed (new size + mtime)
    rep = _update(tmp_path / "a", images, model, assets)
    assert (rep.embedded, rep.reused, rep.removed, rep.count) == (3, 22, 2, 25)
    grown = load_index(tmp_path / "a")
    fresh = _update(tmp_path / "c", images, model, assets)  # a full build of the same folder
    full = load_index(tmp_path / "c")
    assert fresh.embedded == 25 and sorted(it.id for it in grown.items) == sorted(it.id for it in full.items)
    row = {it.id: r for r, it in enumerate(full.items)}
    for r, it in enumerate(grown.items):  # incremental rows = freshly computed rows
        np.testing.assert_allclose(grown.features[r], full.features[row[it.id]], atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [  # only the current generation is kept
        "features-000003.npy", "index-000003.faiss", "items-000003.jsonl", "meta.json"]


def test_caption_recall_equals_msclip_retrieval(assets, model, tmp_path, capsys):
    assert _index_cli("--pretrained", assets / "fitted.safetensors", "--images", assets / "images",
                      "--captions", assets / "captions.csv", "--output", tmp_path / "idx") == 0
    store = load_index(tmp_path / "idx")
    assert store.meta["captioned"] == 24 and store.items[0].captions == list(EMOJI["apple"][1:])
    mine = caption_recall(store, index_model(store, torch.device("cpu")), torch.device("cpu"))
    pairs = read_annotations(str(assets / "captions.csv"), str(assets / "images"))
    ref = evaluate_retrieval(model, pairs, torch.device("cpu"), batch_size=8, progress=False)["metrics"]
    for k in (1, 5, 10):
        assert mine[f"text_to_image_R@{k}_pct"] == pytest.approx(ref[f"text_to_image_R@{k}_pct"])
    chance = 100 / 24
    assert mine["captions"] == 48 and 4 * chance < mine["text_to_image_R@1_pct"] < 100  # informative, not trivial
    capsys.readouterr()
    assert search_cmd.main([str(tmp_path / "idx"), "--recall", "--device", "cpu"]) == 0
    assert f"R@1 {ref['text_to_image_R@1_pct']:.2f} %" in capsys.readouterr().out


def test_unreadable_images_are_skipped_counted_and_not_retried(assets, model, tmp_path, capsys):
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 20)
    (images / "notes.txt").write_text("ignored: not an image")
    assert _index_cli("--pretrained", assets / "fitted.safetensors", "--images", images,
                      "--output", tmp_path / "idx") == 0
    out = capsys.readouterr().out
    assert "3 images (3 embedded now" in out and "1 unreadable skipped (1 new)" in out and "broken.png" in out
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["skipped_count"] == 1 and meta["skipped"][0]["id"] == "broken.png"
    rep = _update(tmp_path / "idx", images, model, assets)
    assert (rep.embedded, rep.skipped_new, len(rep.skipped)) == (0, 0, 1)  # known-bad, unchanged: not retried
    (images / "broken.png").write_bytes(b"still garbage, but changed")
    rep = _update(tmp_path / "idx", images, model, assets)
    assert (rep.embedded, rep.skipped_new, len(rep.skipped), rep.count) == (0, 1, 1, 3)


def test_another_model_is_refused(assets, model, tmp_path, capsys):
    _update(tmp_path / "idx", assets / "images", model, assets)
    before = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert _index_cli("--pretrained", assets / "other.safetensors", "--images", assets / "images",
                      "--output", tmp_path / "idx") == 2
    err = capsys.readouterr().err
    assert "was built with model 'clip-b32-tiny'" in err and "checkpoint sha256" in err and "--rebuild" in err
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == before  # nothing written
    assert search_cmd.main([str(tmp_path / "idx"), "a cat", "--pretrained", str(assets / "other.safetensors")]) == 2
    assert "differ from the ones index" in capsys.readouterr().err
    other = dict(model_identity(MODEL, model, str(assets / "fitted.safetensors"), "fp32"), config_sha256="0" * 64)
    with pytest.raises(ModelMismatchError, match="model config sha256"):  # same weights file, another config
        update_index(tmp_path / "idx", assets / "images", model, other, "cpu")
    assert _index_cli("--images", assets / "images", "--output", tmp_path / "new") == 2  # random weights
    assert "needs trained weights" in capsys.readouterr().err


def test_gallery_one_row_per_query_with_k_scored_images(assets, model, tmp_path, capsys):
    _update(tmp_path / "idx", assets / "images", model, assets, captions_csv=str(assets / "captions.csv"))
    (tmp_path / "q.txt").write_text("a slice of pizza\n\n")
    argv = [str(tmp_path / "idx"), "a red car", "--queries", str(tmp_path / "q.txt"), "--text", "a green frog",
            "--image", str(assets / "images" / "cat.png"), "-k", "4", "--html", str(tmp_path / "g.html"),
            "--output", str(tmp_path / "r.json"), "--device", "cpu"]
    assert search_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "text query: a red car" in out and "image query:" in out
    page = (tmp_path / "g.html").read_text()
    rows = page.split('<div class="row">')[1:]
    assert len(rows) == 4
    report = json.loads((tmp_path / "r.json").read_text())
    for row, res in zip(rows, report["results"]):
        scores = re.findall(r'<div class="score">([0-9.\-]+)</div>', row)
        assert len(scores) == 4 and len(re.findall(r'<img src="data:image/jpeg;base64,', row)) >= 4
        assert [float(s) for s in scores] == [round(h["score"], 3) for h in res["hits"]]
        assert scores == sorted(scores, key=float, reverse=True)
    assert [r["query"] for r in report["results"]] == ["a red car", "a green frog", "a slice of pizza",
                                                        str(assets / "images" / "cat.png")]
    cat = report["results"][3]["hits"][0]
    assert cat["id"] == "cat.png" and cat["score"] == pytest.approx(1.0, abs=1e-5)  # image->image: itself first
    assert search_cmd.main([str(tmp_path / "idx")]) == 2  # no query at all
    assert "no query" in capsys.readouterr().err


def test_ivf_with_every_list_probed_equals_flat(assets, model, tmp_path):
    _update(tmp_path / "flat", assets / "images", model, assets)
    rep = _update(tmp_path / "ivf", assets / "images", model, assets, ivf_threshold=10, nlist=3, nprobe=3)
    assert rep.index_type == "ivf" and load_index(tmp_path / "ivf").meta["index"]["nlist"] == 3
    assert [[i for i, _ in r] for r in _neighbours(tmp_path / "ivf", model)] == \
        [[i for i, _ in r] for r in _neighbours(tmp_path / "flat", model)]


def _png(name):
    buf = io.BytesIO()
    render_emoji(EMOJI[name][0]).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards(assets, model, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, names in enumerate((["apple", "car"], ["frog", "pizza"])):
        members = [m for name in names
                   for m in ((f"{name}.png", _png(name)), (f"{name}.txt", "\n".join(EMOJI[name][1:]).encode()))]
        write_tar(shards / f"{n}.tar", members + ([("zz_bad.png", b"not a png")] if n == 0 else []))
    rep = _update(tmp_path / "idx", shards, model, assets)
    store = load_index(tmp_path / "idx")
    assert rep.count == 4 and rep.skipped_new == 1 and store.items[1].id == "0.tar/car" and store.items[1].captions == list(EMOJI["car"][1:])
    assert _neighbours(tmp_path / "idx", model, k=1)[0][0][0] == "0.tar/car"
    assert store_mod.open_item(store.base, store.items[3].source).size == (48, 48)
    write_tar(shards / "2.tar", [("cat.png", _png("cat"))])  # a new shard: only its sample is embedded
    rep = _update(tmp_path / "idx", shards, model, assets)
    assert (rep.embedded, rep.reused, rep.count, len(rep.skipped), rep.skipped_new) == (1, 4, 5, 1, 0)


def test_interrupted_update_keeps_the_previous_index(assets, model, tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    write_emoji(images, ["pizza"])

    write_bytes = store_mod.mio.write_bytes

    def crash(path, data):  # killed while writing the FAISS file (after features and items)
        if str(path).endswith(".faiss"):
            raise KeyboardInterrupt
        return write_bytes(path, data)

    monkeypatch.setattr(store_mod.mio, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        _update(tmp_path / "idx", images, model, assets)
    monkeypatch.undo()
    assert load_index(tmp_path / "idx").meta["count"] == 3  # meta.json still names the complete old files
    assert _update(tmp_path / "idx", images, model, assets).count == 4
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    os.remove(tmp_path / "idx" / meta["files"]["features"])
    with pytest.raises(store_mod.IndexStoreError, match="features file .* is missing"):
        load_index(tmp_path / "idx")
