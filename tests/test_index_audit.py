"""Audit of `msclip index` / `msclip search` (docs/search.md), found by mutation testing of src/msclip/index/ and
the two commands: the size+mtime key of re-runs, row order, captions kept, --rebuild, model paths that work from
any folder, the flat / IVF choice and IVF reuse, nprobe, the index folder's checks and generations, search
results and caption recall, the CLI's checks and console lines, and the HTML gallery's escaping and content."""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

import msclip
from msclip.commands import search as search_cmd
from msclip.index import search as search_mod
from msclip.index.gallery import Cell, Row, render_gallery, search_rows
from msclip.index.search import Hit, QueryError, QueryResult, caption_recall, embed_text_queries, search
from msclip.index.store import IndexStore, IndexStoreError, Item, load_index
from shard_utils import write_tar
from test_index import (EMOJI, MODEL, _index_cli, _png, _update, assets, model, render_emoji,  # noqa: F401
                        write_emoji)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(path):
    return [it.id for it in load_index(path).items]


def _captions_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def _ivf(out, images, model, assets, **kw):
    kw = {"ivf_threshold": 1, "nlist": 1, "nprobe": 1, **kw}
    return _update(out, images, model, assets, **kw)


# ------------------------------------------------------------------------- incremental key: path + size + mtime
def test_same_size_new_mtime_is_embedded_again(assets, model, tmp_path):
    """A file whose mtime changed (same size) is embedded again, not reused."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    st = os.stat(images / "car.png")
    os.utime(images / "car.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rep = _update(tmp_path / "idx", images, model, assets)
    assert (rep.embedded, rep.reused, rep.removed, rep.count) == (1, 2, 1, 3)


def test_new_content_same_mtime_is_embedded_again(assets, model, tmp_path):
    """A file whose size changed (mtime restored) is embedded again: its row holds the new image's embedding."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    st = os.stat(images / "car.png")
    render_emoji(EMOJI["pizza"][0], size=40).save(images / "car.png")
    os.utime(images / "car.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(images / "car.png").st_size != st.st_size
    rep = _update(tmp_path / "idx", images, model, assets)
    assert (rep.embedded, rep.reused, rep.removed) == (1, 2, 1)
    fresh = _update(tmp_path / "fresh", images, model, assets)
    assert fresh.count == 3
    a, b = load_index(tmp_path / "idx"), load_index(tmp_path / "fresh")
    row_a, row_b = _ids(tmp_path / "idx").index("car.png"), _ids(tmp_path / "fresh").index("car.png")
    np.testing.assert_allclose(a.features[row_a], b.features[row_b], atol=1e-6)


def test_unchanged_rerun_keeps_row_numbers(assets, model, tmp_path):
    """Rows keep their numbers on a re-run (appended files stay at the end, not re-sorted)."""
    images = tmp_path / "images"
    write_emoji(images, ["car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    write_emoji(images, ["apple"])  # sorts first, appended last
    _update(tmp_path / "idx", images, model, assets)
    before = load_index(tmp_path / "idx")
    assert [it.id for it in before.items] == ["car.png", "frog.png", "apple.png"]
    rep = _update(tmp_path / "idx", images, model, assets)
    after = load_index(tmp_path / "idx")
    assert rep.embedded == 0 and [it.id for it in after.items] == ["car.png", "frog.png", "apple.png"]
    np.testing.assert_array_equal(after.features, before.features)


def test_rewritten_shard_is_read_again(assets, model, tmp_path):
    """A WebDataset shard that changed is read again: its new samples replace the old ones."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "0.tar", [("apple.png", _png("apple")), ("car.png", _png("car"))])
    _update(tmp_path / "idx", shards, model, assets)
    write_tar(shards / "0.tar", [("apple.png", _png("apple")), ("bus.png", _png("bus")), ("dog.png", _png("dog"))])
    st = os.stat(shards / "0.tar")
    os.utime(shards / "0.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    rep = _update(tmp_path / "idx", shards, model, assets)
    assert rep.count == 3 and sorted(_ids(tmp_path / "idx")) == ["0.tar/apple", "0.tar/bus", "0.tar/dog"]


# ------------------------------------------------------------------------- captions
def test_captions_are_kept_by_a_run_without_captions(assets, model, tmp_path):
    """A later run without --captions keeps the stored captions, also of a changed (re-embedded) image."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    csv_path = _captions_csv(tmp_path / "c.csv", [("apple.png", "a red apple"), ("car.png", "a red car")])
    _update(tmp_path / "idx", images, model, assets, captions_csv=str(csv_path))
    render_emoji(EMOJI["bus"][0]).save(images / "car.png")
    rep = _update(tmp_path / "idx", images, model, assets)
    store = load_index(tmp_path / "idx")
    caps = {it.id: it.captions for it in store.items}
    assert rep.embedded == 1 and caps == {"apple.png": ["a red apple"], "car.png": ["a red car"], "frog.png": []}
    assert store.meta["captioned"] == 2


def test_captions_of_an_unreadable_image_are_kept_until_it_is_readable(assets, model, tmp_path):
    """CSV captions of an image unreadable at indexing time are stored with its skip entry (also through an
    unchanged re-run), so once the image is fixed a run without --captions indexes it with them."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car"])
    (images / "blue.png").write_bytes(b"not a png")
    csv_path = _captions_csv(tmp_path / "c.csv", [("apple.png", "a red apple"), ("blue.png", "a blue sky")])
    _update(tmp_path / "idx", images, model, assets, captions_csv=str(csv_path))
    _update(tmp_path / "idx", images, model, assets)  # unchanged and unreadable: not retried, captions kept
    render_emoji(EMOJI["car"][0]).save(images / "blue.png")
    rep = _update(tmp_path / "idx", images, model, assets)
    caps = {it.id: it.captions for it in load_index(tmp_path / "idx").items}
    assert rep.embedded == 1 and caps["blue.png"] == ["a blue sky"] and caps["apple.png"] == ["a red apple"]


def test_caption_rows_of_missing_images_are_counted_and_printed(assets, tmp_path, capsys):
    """Caption rows naming images not under --images are counted and reported on the console."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car"])
    csv_path = _captions_csv(tmp_path / "c.csv", [("apple.png", "a red apple"), ("gone.png", "x"), ("nope.png", "y")])
    assert _index_cli("--pretrained", assets / "fitted.safetensors", "--images", images, "--captions", csv_path,
                      "--output", tmp_path / "idx") == 0
    assert f"2 captioned images of {csv_path} are not under {images}" in capsys.readouterr().out


# ------------------------------------------------------------------------- model identity and paths
def test_rebuild_replaces_an_index_of_another_model(assets, model, tmp_path, capsys):
    """--rebuild ignores the stored index, even one built with another model, and embeds everything."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    assert _index_cli("--pretrained", assets / "other.safetensors", "--images", images, "--output", tmp_path / "idx",
                      "--rebuild") == 0
    assert "3 images (3 embedded now, 0 reused" in capsys.readouterr().out
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["model"]["checkpoint"] == str(assets / "other.safetensors")


def test_index_made_with_relative_paths_is_searchable_from_another_folder(assets, tmp_path, monkeypatch, capsys):
    """A relative --pretrained and a relative .json config are recorded so that search works from any folder."""
    work = tmp_path / "work"
    write_emoji(work / "images", ["apple", "car"])
    msclip.save_pretrained(msclip.create_model(MODEL), work / "model")  # model/config.json: a .json config
    monkeypatch.chdir(work)
    assert _index_cli("--model", "model/config.json", "--pretrained", "model/model.safetensors",
                      "--images", "images", "--output", "idx") == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert search_cmd.main(["work/idx", "a red car", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert "text query: a red car" in capsys.readouterr().out


def test_index_of_a_model_folder_is_searchable_from_another_folder(tmp_path, monkeypatch, capsys):
    """An index made with a relative model folder (README's example) can be searched from another folder
    (the folder is stored absolute; a registered name stays a name even beside a folder of that name)."""
    work = tmp_path / "work"
    write_emoji(work / "images", ["apple", "car"])
    msclip.save_pretrained(msclip.create_model(MODEL), work / "models" / "mine")
    monkeypatch.chdir(work)
    assert _index_cli("--model", "models/mine", "--images", "images", "--output", "idx") == 0
    monkeypatch.chdir(tmp_path)
    assert search_cmd.main(["work/idx", "a red car", "--device", "cpu"]) == 0, capsys.readouterr().err
    from msclip.index.store import model_identity

    (tmp_path / MODEL).mkdir()
    model = msclip.create_model(MODEL)
    weights = work / "models" / "mine" / "model.safetensors"
    assert model_identity(MODEL, model, str(weights), "fp32")["spec"] == MODEL


def test_moved_weights_are_named_and_found_with_pretrained(assets, model, tmp_path, capsys):
    """Weights moved after indexing: search names them and asks for --pretrained, which then works."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((assets / "fitted.safetensors").read_bytes())
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car"])
    assert _index_cli("--pretrained", weights, "--images", images, "--output", tmp_path / "idx") == 0
    moved = weights.rename(tmp_path / "moved.safetensors")
    capsys.readouterr()
    assert search_cmd.main([str(tmp_path / "idx"), "a red car", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "--pretrained" in err
    assert search_cmd.main([str(tmp_path / "idx"), "a red car", "--device", "cpu", "--pretrained", str(moved)]) == 0


# ------------------------------------------------------------------------- flat or IVF
def test_ivf_from_the_threshold_on_and_default_nlist(assets, model, tmp_path):
    """N images at --ivf-threshold N give IVF with nlist min(4 sqrt N, N/39) (at least 1); N+1 gives flat."""
    images = tmp_path / "images"
    write_emoji(images, list(EMOJI)[:6])
    rep = _update(tmp_path / "ivf", images, model, assets, ivf_threshold=6)
    assert rep.index_type == "ivf"
    assert load_index(tmp_path / "ivf").meta["index"] == {"type": "ivf", "nlist": 1, "trained_on": 6}
    assert _update(tmp_path / "flat", images, model, assets, ivf_threshold=7).index_type == "flat"


def test_nlist_larger_than_the_images_is_refused(assets, model, tmp_path):
    """--nlist above the number of images is an error naming --nlist and the count."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    with pytest.raises(IndexStoreError, match="--nlist 5 is larger than the 3 indexed images"):
        _ivf(tmp_path / "idx", images, model, assets, nlist=5)


def test_ivf_appends_reuse_the_trained_index_until_4x(assets, model, tmp_path):
    """Appends reuse the trained IVF index up to 4x its training size; beyond, and after a removal, it retrains."""
    images = tmp_path / "images"
    names = list(EMOJI)
    write_emoji(images, names[:3])
    _ivf(tmp_path / "idx", images, model, assets)
    write_emoji(images, names[3:12])  # 12 = 4 x 3: still reused
    assert _ivf(tmp_path / "idx", images, model, assets).count == 12
    assert load_index(tmp_path / "idx").meta["index"]["trained_on"] == 3
    write_emoji(images, names[12:13])  # 13 > 4 x 3: retrained
    _ivf(tmp_path / "idx", images, model, assets)
    assert load_index(tmp_path / "idx").meta["index"]["trained_on"] == 13
    os.remove(images / f"{names[0]}.png")  # a removal retrains
    rep = _ivf(tmp_path / "idx", images, model, assets)
    store = load_index(tmp_path / "idx")
    assert rep.count == 12 and store.meta["index"]["trained_on"] == 12 and store.index.ntotal == 12


def test_ivf_rebuilt_for_another_nlist_or_a_raised_threshold(assets, model, tmp_path):
    """An explicit other --nlist retrains the IVF index; a threshold raised above the count makes it flat."""
    images = tmp_path / "images"
    write_emoji(images, list(EMOJI)[:6])
    _ivf(tmp_path / "idx", images, model, assets)
    _ivf(tmp_path / "idx", images, model, assets, nlist=2)
    assert load_index(tmp_path / "idx").meta["index"] == {"type": "ivf", "nlist": 2, "trained_on": 6}
    assert _update(tmp_path / "idx", images, model, assets, ivf_threshold=100).index_type == "flat"
    assert isinstance(load_index(tmp_path / "idx").index, faiss.IndexFlatIP)


def test_nprobe_is_stored_and_search_nprobe_overrides_it(assets, model, tmp_path):
    """The index's nprobe is stored and used; --nprobe overrides it; unfilled result slots are not hits."""
    images = tmp_path / "images"
    write_emoji(images, list(EMOJI)[:12])
    _update(tmp_path / "idx", images, model, assets, ivf_threshold=1, nlist=4, nprobe=1)
    store = load_index(tmp_path / "idx")
    assert store.meta["nprobe"] == 1
    q = embed_text_queries(model, ["a red car"], "cpu")
    few = search(store, q, [("a red car", "text")], 12)[0].hits
    assert 0 < len(few) < 12 and all(h.row >= 0 and h.id == store.items[h.row].id for h in few)
    every = search(store, q, [("a red car", "text")], 12, nprobe=4)[0].hits
    assert sorted(h.row for h in every) == list(range(12))


# ------------------------------------------------------------------------- the index folder
def test_search_k_is_clamped_and_results_are_exact_cosine_best_first(assets, model, tmp_path):
    """search returns min(k, N) rows, best first, scored by the cosine of query and stored unit features."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car", "frog"])
    _update(tmp_path / "idx", images, model, assets)
    store = load_index(tmp_path / "idx")
    q = embed_text_queries(model, ["a red car", "a frog"], "cpu")
    scores, rows = store.search(q, 10)
    assert scores.shape == rows.shape == (2, 3)
    cos = q @ store.features.T
    for s, r, c in zip(scores, rows, cos):
        assert list(r) == list(np.argsort(-c)) and np.allclose(s, c[r], atol=1e-5)
    assert np.allclose(np.linalg.norm(store.features, axis=1), 1, atol=1e-5)


def test_foreign_or_broken_meta_and_inconsistent_rows_are_refused(assets, model, tmp_path):
    """A meta.json that is not an msclip index, or unreadable, or files whose row counts differ: clear errors."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car"])
    _update(tmp_path / "idx", images, model, assets)
    meta_path = tmp_path / "idx" / "meta.json"
    meta = json.loads(meta_path.read_text())
    items_path = tmp_path / "idx" / meta["files"]["items"]
    items_path.write_text(items_path.read_text().splitlines()[0] + "\n")
    with pytest.raises(IndexStoreError, match="inconsistent.*'items': 1"):
        load_index(tmp_path / "idx")
    meta_path.write_text(json.dumps(dict(meta, kind="something-else")))
    with pytest.raises(IndexStoreError, match="meta.json: not an msclip index"):
        load_index(tmp_path / "idx")
    meta_path.write_text("{not json")
    with pytest.raises(IndexStoreError, match="meta.json: unreadable"):
        load_index(tmp_path / "idx")


def test_update_clears_temporaries_and_old_generations_but_not_other_files(assets, model, tmp_path):
    """An update removes a killed run's temporaries and other generations' files, never other files."""
    images = tmp_path / "images"
    write_emoji(images, ["apple", "car"])
    out = tmp_path / "idx"
    _update(out, images, model, assets)
    (out / ".msclip-tmp-features-000002.npy.abc").write_bytes(b"half")  # a killed run's leftovers
    (out / "features-000007.npy").write_bytes(b"half")
    for name in ("notes.npy", "my-notes.jsonl", "README.txt"):
        (out / name).write_text("mine")
    _update(out, images, model, assets)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.txt", "features-000008.npy", "index-000008.faiss", "items-000008.jsonl", "meta.json",
        "my-notes.jsonl", "notes.npy"]


def test_no_readable_image_is_an_error_naming_one(assets, model, tmp_path):
    """A folder whose images are all unreadable is an error naming the first one and its count."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(IndexStoreError, match=r"no image could be read \(1 unreadable; first: broken.png"):
        _update(tmp_path / "idx", images, model, assets)
    assert not (tmp_path / "idx" / "meta.json").exists()


def test_shards_without_images_are_an_error(assets, model, tmp_path):
    """WebDataset shards without any image sample are an error naming --images."""
    write_tar(tmp_path / "0.tar", [("a.txt", b"a caption"), ("b.txt", b"another")])
    with pytest.raises(IndexStoreError, match="shards hold no sample with an image"):
        _update(tmp_path / "idx", tmp_path / "0.tar", model, assets)


# ------------------------------------------------------------------------- caption recall
def _toy_store(tmp_path, captions: list[list[str]]) -> IndexStore:
    feats = np.eye(4, dtype=np.float32)
    index = faiss.IndexFlatIP(4)
    index.add(feats)
    items = [Item(f"i{r}.png", {"path": f"i{r}.png"}, [1, 1], caps) for r, caps in enumerate(captions)]
    return IndexStore(tmp_path, {"nprobe": 1}, items, feats, index)


def test_caption_recall_counts_the_own_image_within_k_and_caps_chance(tmp_path, monkeypatch):
    """R@k counts captions whose own image is among the k best; chance is k / images, at most 100 %."""
    store = _toy_store(tmp_path, [["c0"], ["c1"], ["c2"], ["c3"]])
    # caption r's own image r is ranked r + 1 (other images score higher, in order 0, 1, 2, 3)
    emb = np.array([[1.0, .5, .4, .3], [.9, .8, .4, .3], [.9, .8, .7, .3], [.9, .8, .7, .6]], dtype=np.float32)
    monkeypatch.setattr(search_mod, "embed_text_queries", lambda model, texts, device: emb[:len(texts)])
    rec = caption_recall(store, None, "cpu", ks=(1, 2, 3, 5))
    assert [rec[f"text_to_image_R@{k}_pct"] for k in (1, 2, 3, 5)] == [25.0, 50.0, 75.0, 100.0]
    assert [rec[f"chance_R@{k}_pct"] for k in (1, 2, 3, 5)] == [25.0, 50.0, 75.0, 100.0]
    assert (rec["captions"], rec["images"]) == (4, 4)


def test_caption_recall_without_captions_is_an_error(tmp_path):
    """--recall on an index without captions is an error naming the index and --captions."""
    with pytest.raises(QueryError, match="holds no captions.*--captions"):
        caption_recall(_toy_store(tmp_path, [[], [], [], []]), None, "cpu")


# ------------------------------------------------------------------------- msclip search / msclip index CLI
@pytest.fixture(scope="module")
def small_index(assets, model, tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_emoji(root / "images", ["apple", "car", "frog"])
    csv_path = _captions_csv(root / "c.csv", [("car.png", "a red car"), ("car.png", "a car")])
    _update(root / "idx", root / "images", model, assets, captions_csv=str(csv_path))
    return root


def test_search_console_lines_and_json_hits(small_index, tmp_path, capsys):
    """Console: rank, cosine score, id and first caption per hit, best first; JSON: row, score, id, captions."""
    assert search_cmd.main([str(small_index / "idx"), "a red car", "-k", "2", "--device", "cpu",
                            "--output", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    hits = json.loads((tmp_path / "r.json").read_text())["results"][0]["hits"]
    assert lines[0] == "text query: a red car" and len(hits) == 2 and hits[0]["id"] == "car.png"
    assert lines[1] == f"    1  {hits[0]['score']:.4f}  car.png  'a red car'"
    assert lines[2] == f"    2  {hits[1]['score']:.4f}  {hits[1]['id']}"
    assert hits[0]["score"] >= hits[1]["score"] and hits[0]["captions"] == ["a red car", "a car"]
    assert set(hits[0]) == {"row", "score", "id", "captions"}


def test_search_usage_errors(small_index, tmp_path, capsys):
    """Blank-only queries, a missing --queries file, -k 0 and missing or unreadable query images are errors."""
    idx = str(small_index / "idx")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    queries, nope = str(tmp_path / "q.txt"), str(tmp_path / "nope.png")
    cases = [([idx, "   ", "--text", ""], "no query"),
             ([idx, "--queries", queries], f"--queries {queries!r} does not exist"),
             ([idx, "a car", "-k", "0"], "-k"), ([idx, "--image", nope], f"query image {nope!r} does not exist"),
             ([idx, "--image", str(tmp_path / "bad.png")], "bad.png' cannot be read")]
    for argv, msg in cases:
        capsys.readouterr()
        assert search_cmd.main([*argv, "--device", "cpu"]) == 2, argv
        assert msg in capsys.readouterr().err, argv


@pytest.mark.parametrize("flag", ["--nlist", "--ivf-threshold", "--nprobe"])
def test_index_flags_below_one_are_refused(assets, tmp_path, capsys, flag):
    """--nlist, --ivf-threshold and --nprobe of 0 are usage errors naming the flag."""
    assert _index_cli("--pretrained", assets / "fitted.safetensors", "--images", tmp_path, "--output",
                      tmp_path / "idx", flag, "0") == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------- the gallery
def test_gallery_escapes_every_text(tmp_path):
    """Query, note, title, subtitle, file names, alt text and tooltips are HTML-escaped."""
    bad = '<b x="1">&'
    row = Row(bad + "q", [Cell(lambda: Image.new("RGB", (8, 8)), 0.5, bad + "t", bad + "tip")],
              query_image=lambda: Image.new("RGB", (8, 8)), note=bad + "n")
    page = render_gallery([row], bad + "title", bad + "sub")
    assert "<b " not in page and '"1"' not in page
    esc = "&lt;b x=&quot;1&quot;&gt;&amp;"
    for suffix in ("q", "n", "title", "sub", "t", "tip"):
        assert esc + suffix in page, suffix
    assert f'alt="{esc}q"' in page and f'alt="{esc}t"' in page


def test_gallery_thumbnails_and_unreadable_placeholder():
    """Thumbnails are JPEG data URIs with the longest side --thumb; an image that cannot be opened is a
    placeholder, not a crash."""
    def gone():
        raise FileNotFoundError("gone since indexing")

    page = render_gallery([Row("q", [Cell(lambda: Image.new("RGB", (200, 100), "red"), 0.9, "a.png"),
                                     Cell(gone, 0.1, "b.png")])], "t", thumb=64)
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(uris) == 1 and Image.open(io.BytesIO(base64.b64decode(uris[0]))).size == (64, 32)
    assert page.count(">unreadable</div>") == 1 and '<div class="score">0.100</div>' in page


def test_search_rows_query_thumbnail_names_and_tooltips(tmp_path):
    """Gallery rows: an image query shows its thumbnail, a text query none; cells are titled by file name with
    the id and captions as tooltip."""
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "q.png")
    hits = [Hit(0, 0.75, "0.tar/car", ["a red car", "a car"])]
    results = [QueryResult("a car", "text", hits), QueryResult(str(tmp_path / "q.png"), "image", hits)]
    rows = search_rows(results, lambda r: Image.new("RGB", (20, 20), "red"))
    assert rows[0].query_image is None and rows[1].query_image().size == (20, 20)
    cell = rows[0].cells[0]
    assert (cell.title, cell.tooltip, cell.score) == ("car", "0.tar/car\na red car\na car", 0.75)
    page = render_gallery(rows, "t")
    assert page.count('<div class="query"><img src="data:image/jpeg;base64,') == 1
