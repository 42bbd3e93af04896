"""End to end: `msclip linprobe`, `compare`, `retrieval` and `analyze` on a tiny random-init model."""
import csv
import json
import unicodedata
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from msclip.cli import main

MODEL = "clip-b32-tiny"
COMMON = ["--model", MODEL, "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _colors(root: Path, n_train=8, n_test=4):
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (32, 32), tuple(min(255, c + 4 * i) for c in rgb))
                img.save(root / split / name / f"{i}.png")
    (root / "test" / "red" / "corrupt.png").write_bytes(b"\x89PNG broken")


def _emoji_font() -> str | None:
    from matplotlib import font_manager

    return next((f for f in font_manager.findSystemFonts(fontext="ttf") if Path(f).name == "NotoColorEmoji.ttf"),
                None)


def _emoji_pairs(root: Path, n: int = 12) -> Path:
    """Real image-caption pairs: Noto colour emoji rendered by Pillow, captioned with their Unicode names."""
    font_path = _emoji_font()
    if font_path is None:
        pytest.skip("fonts-noto-color-emoji is not installed (scripts/setup_data.sh installs it)")
    font = ImageFont.truetype(font_path, 109)
    rows = []
    for cp in [0x1F438, 0x1F42D, 0x1F34E, 0x1F697, 0x1F680, 0x1F3E0, 0x1F33B, 0x1F41F, 0x1F36A, 0x1F6B2,
               0x1F422, 0x1F9C0][:n]:
        ch, name = chr(cp), unicodedata.name(chr(cp)).lower()
        img = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(img).text((0, 0), ch, font=font, embedded_color=True)
        img.save(root / f"u{cp:x}.png")
        rows += [[f"u{cp:x}.png", name], [f"u{cp:x}.png", f"an emoji of a {name}"]]
    with open(root / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"]] + rows)
    return root / "pairs.csv"


def test_linprobe_cache_and_compare(tmp_path, capsys):
    _colors(tmp_path / "colors")
    out_a, cache = tmp_path / "a.json", tmp_path / "cache"
    args = COMMON + ["--dataset", f"colors:{tmp_path / 'colors'}", "--dataset", f"cifar10:{tmp_path / 'none'}",
                     "--cache-dir", str(cache), "--output", str(out_a)]
    assert main(["linprobe"] + args) == 0
    rep = json.loads(out_a.read_text())
    colors = rep["datasets"]["colors"]
    assert colors["status"] == "ok" and colors["score_pct"] >= 75.0  # random features still separate two colours
    assert colors["skipped_corrupt"] == {"train": 0, "test": 1} and colors["n_test"] == 8
    assert rep["datasets"]["cifar10"]["status"] == "missing" and rep["n_ok"] == 1
    assert "| colors | accuracy |" in (tmp_path / "a.md").read_text()
    n_cached = sorted(p.name for p in cache.iterdir())
    assert len(n_cached) == 2  # train and test features

    capsys.readouterr()
    out_b = tmp_path / "b.json"
    assert main(["linprobe"] + args[:-1] + [str(out_b), "--protocol", "sgd", "--epochs", "5"]) == 0
    err = capsys.readouterr().err
    assert "colors/train: 16 features (cache)" in err and "colors/test: 8 features (cache)" in err
    assert sorted(p.name for p in cache.iterdir()) == n_cached  # nothing re-extracted
    rep_b = json.loads(out_b.read_text())
    assert "weight_decay" in rep_b["datasets"]["colors"]["hparam"]
    assert rep_b["settings"]["features"] == "pre-projection"

    out_c = tmp_path / "c.json"  # the joint embedding is another feature set: extracted and cached apart
    assert main(["linprobe"] + args[:-1] + [str(out_c), "--features", "embedding", "--tol", "1e-6"]) == 0
    assert "colors/train: 16 features (extracted)" in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 4
    rep_c = json.loads(out_c.read_text())
    assert rep_c["settings"]["features"] == "embedding" and rep_c["settings"]["tol"] == 1e-6

    assert main(["compare", str(out_a), str(out_b), "--names", "lbfgs", "adamw"]) == 0
    table = capsys.readouterr().out
    assert "| colors | accuracy |" in table and "| cifar10 |" in table and "mean over 1 shared" in table


def test_linprobe_cache_misses_after_a_config_file_is_edited_in_place(tmp_path, capsys):
    """The feature cache is keyed by the model's config, not only its spec: a .json config edited in place
    (same path, same random-init seed) extracts anew instead of reusing the old features."""
    import msclip

    _colors(tmp_path / "colors")
    cfg = msclip.get_model_config(MODEL).to_dict()
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps(cfg))
    args = [a if a != MODEL else str(spec) for a in COMMON] + [
        "--dataset", f"colors:{tmp_path / 'colors'}", "--cache-dir", str(tmp_path / "cache"),
        "--output", str(tmp_path / "a.json")]
    assert main(["linprobe"] + args) == 0
    capsys.readouterr()
    spec.write_text(json.dumps({**cfg, "embed_dim": cfg["embed_dim"] // 2}))
    assert main(["linprobe"] + args) == 0
    assert "colors/train: 16 features (extracted)" in capsys.readouterr().err


def test_retrieval_on_rendered_emoji(tmp_path, capsys):
    ann = _emoji_pairs(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (tmp_path / "x.png").write_bytes(b"garbage")  # an unreadable image: skipped, its caption dropped
    with open(ann, "a", newline="") as f:
        csv.writer(f).writerow(["x.png", "nothing"])
    out = tmp_path / "r.json"
    assert main(["retrieval"] + COMMON + ["--annotations", str(ann), "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert (rep["images"], rep["captions"], rep["skipped_images"], rep["dropped_captions"]) == (12, 24, 1, 1)
    m = rep["metrics"]
    assert m["image_to_text_R@10_pct"] >= m["image_to_text_R@5_pct"] >= m["image_to_text_R@1_pct"] >= 0
    assert 0 <= m["text_to_image_R@1_pct"] <= 100
    assert "image→text" in capsys.readouterr().out


CAPTIONS = ["a red square", "a blue square", "a photo of a cat", "red", "blue", "a dog", "a red dot",
            "the sky", "an apple", "a car"]


def test_analyze_writes_report_nmi_gap_and_pngs(tmp_path, capsys, monkeypatch):
    _colors(tmp_path / "imgs", n_train=5, n_test=0)  # 10 images + one corrupt PNG
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CAPTIONS[:5] + ["", "  "] + CAPTIONS[5:]) + "\n")
    out = tmp_path / "an"
    import msclip

    passes = {"intermediates": 0, "encode_image": 0}
    real_fi, real_ei = msclip.MSCLIP.forward_intermediates, msclip.MSCLIP.encode_image

    def counting_fi(self, images=None, tokens=None, **kw):
        passes["intermediates"] += 0 if images is None else len(images)
        return real_fi(self, images=images, tokens=tokens, **kw)

    def counting_ei(self, images, *a, **kw):
        passes["encode_image"] += len(images)
        return real_ei(self, images, *a, **kw)

    monkeypatch.setattr(msclip.MSCLIP, "forward_intermediates", counting_fi)
    monkeypatch.setattr(msclip.MSCLIP, "encode_image", counting_ei)
    rc = main(["analyze"] + COMMON + ["--images", str(tmp_path / "imgs"), "--texts", str(texts),
                                      "--output-dir", str(out), "--attn-layers", "0", "5", "--attn-heads", "0",
                                      "--attn-samples", "1"])
    assert rc == 0
    assert passes == {"intermediates": 10, "encode_image": 10}  # each image through the model once per path
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "blank caption line(s)" in err and "6, 7" in err
    rep = json.loads((out / "analysis.json").read_text())
    assert rep["images"] == 10 and rep["texts"] == 10 and rep["skipped_images"] == 1  # the corrupt PNG
    assert rep["blank_caption_lines"] == [6, 7]
    assert rep["modality_gap"] > 0 and [r["layer"] for r in rep["layers"]] == list(range(6))
    assert all(0.0 <= r["nmi"] <= 1.0 for r in rep["layers"])
    assert sorted(Path(p).name for p in rep["attention_pngs"]) == [
        "image000_layer00.png", "image000_layer05.png", "text000_layer00.png", "text000_layer05.png"]
    pooled = torch.load(out / "pooled_hidden.pt", weights_only=True)
    assert pooled["image_pooled"].shape[:2] == (6, 10) and pooled["text_pooled"].shape[:2] == (6, 10)
    md = (out / "report.md").read_text()
    for png in ("nmi.png", "gap.png", "attention/image000_layer00.png", "attention/text000_layer05.png"):
        assert f"]({png})" in md and (out / png).is_file()
    assert "corrupt.png" in md


def test_analyze_refuses_too_few_samples(tmp_path, capsys):
    _colors(tmp_path / "imgs", n_train=5, n_test=0)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(CAPTIONS[:9]) + "\n")
    out = tmp_path / "an"
    assert main(["analyze"] + COMMON + ["--images", str(tmp_path / "imgs"), "--texts", str(texts),
                                        "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "at least 10 images and 10 captions" in err and "given: 11 images and 9 captions" in err  # 10 + the corrupt PNG
    assert not out.exists()
    # enough files, but one image unreadable: 9 readable images are refused after the pass
    texts.write_text("\n".join(CAPTIONS) + "\n")
    (tmp_path / "imgs" / "train" / "red" / "0.png").write_bytes(b"garbage")
    assert main(["analyze"] + COMMON + ["--images", str(tmp_path / "imgs"), "--texts", str(texts),
                                        "--output-dir", str(out)]) == 2
    assert "readable: 9 images and 10 captions" in capsys.readouterr().err
