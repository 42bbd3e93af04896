"""Zero-shot classification: official parity on the tiny reference, metrics, data handling, CLI."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image, ImageFile

import msclip
from msclip.commands import zeroshot as zs_cmd
from msclip.eval.features import collate_skip, encode_tokens
from msclip.eval.imagefolder import (DataError, folder_classnames, folder_dataset, load_rgb, resolve_classnames,
                                     scan_image_folder)
from msclip.eval.templates import TemplateError, fill_template, imagenet_classnames, load_templates
from msclip.eval.zeroshot import build_classifier, classifier_from_tokens, zeroshot_logits, zeroshot_metrics

from image_folder_utils import make_photo_folder
from reference_utils import load_reference_model


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


# ----------------------------------------------------------------------------- official parity
def test_reference_zeroshot_weights_and_logits(reference):
    model, inputs, outputs = reference
    # From the official tokens (class-major, 3 classes x 4 templates), in odd-sized sorted batches.
    W = classifier_from_tokens(model, inputs["zs_tokens"], 3, "cpu", batch_size=5)
    assert W.shape == outputs["zs_weights"].shape == (32, 3)
    torch.testing.assert_close(W, outputs["zs_weights"], atol=1e-5, rtol=0)
    # From the strings, through msclip's tokenizer (hard truncation, as the official one).
    tok = msclip.get_tokenizer(model.cfg)
    W2 = build_classifier(model, tok, inputs["zs_classnames"], inputs["zs_templates"], "cpu",
                          text_batch_size=3, texts_per_chunk=8)  # 2 classes per chunk: exercises chunking
    torch.testing.assert_close(W2, outputs["zs_weights"], atol=1e-5, rtol=0)
    # Tokenising in a DataLoader worker, one class per chunk, gives the same classifier.
    W3 = build_classifier(model, tok, inputs["zs_classnames"], inputs["zs_templates"], "cpu", texts_per_chunk=4,
                          workers=1)
    torch.testing.assert_close(W3, W2, atol=1e-6, rtol=0)
    with torch.inference_mode():
        f = model.encode_image(inputs["images"], normalize=True)
    logits = zeroshot_logits(f, W)
    # Logits are 100 x cosine (~10-17). CPUs sum the image GEMMs in different orders (AVX2 vs AVX-512 kernels:
    # 2.9e-5 seen on an AMD EPYC), so allow 1e-6 in cosine units: far below any real parity error.
    torch.testing.assert_close(logits, outputs["zs_logits"], atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == outputs["zs_logits"].argmax(-1).tolist()


def test_text_trim_changes_no_output(reference):
    model, inputs, _ = reference
    toks = inputs["text_tokens"]  # includes an empty text and an over-long one with no EOT (pooled at 0)
    cases = [toks, inputs["zs_tokens"], toks[4:5], toks[3:5], toks[:3]]
    with torch.inference_mode():
        for t in cases:
            assert model.trim_tokens(t).shape[1] < t.shape[1]  # the cut really happens
            torch.testing.assert_close(model.encode_text(t), model.encode_text(t, trim=False), atol=1e-5, rtol=0)
        # Length-sorted batching (encode_tokens) returns rows in input order, equal to one plain call.
        plain = model.encode_text(toks, normalize=True, trim=False)
    for bs in (1, 2, 5):
        torch.testing.assert_close(encode_tokens(model, toks, "cpu", batch_size=bs), plain, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    logits = torch.tensor([
        [9, 1, 0, 0, 0, 0],  # label 0: top-1 hit
        [1, 9, 8, 7, 6, 5],  # label 5: miss at top-1, hit at top-5 (rank 5)
        [0, 9, 8, 7, 6, 5],  # label 0: miss at top-5 (rank 6)
        [0, 0, 9, 0, 0, 0],  # label 2: hit
    ], dtype=torch.float)
    r = zeroshot_metrics(logits, torch.tensor([0, 5, 0, 2]), 6)
    assert r["top1_pct"] == 50.0 and r["top5_pct"] == 75.0 and r["images"] == 4 and r["top5_k"] == 5
    # per-class recall: class 0 1/2, class 2 1/1, class 5 0/1 (classes without images are left out)
    assert r["mean_per_class_recall_pct"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    pc = r["per_class"]
    assert pc[0]["images"] == 2 and pc[0]["correct"] == 1 and pc[0]["recall_pct"] == 50.0
    assert pc[1]["images"] == 0 and pc[1]["recall_pct"] is None
    assert zeroshot_metrics(logits[:, :3], torch.tensor([0, 1, 0, 2]), 3)["top5_k"] == 3  # top-k over every class
    assert zeroshot_metrics(torch.eye(3), torch.tensor([0, 1, 2]), 3)["top1_pct"] == 100.0  # exact, not float32


def test_prompt_filling_is_the_official_plain_format():
    # the official zero-shot script fills with str.format; rewriting "a" to "an" would change ImageNet prompts
    # such as "a photo of a American robin." and so the official numbers
    assert fill_template("a photo of a {}.", "ankle boot") == "a photo of a ankle boot."
    assert fill_template("a bad photo of a {}.", "American robin") == "a bad photo of a American robin."
    assert fill_template("{} in the wild", "apple") == "apple in the wild"
    assert load_templates("generic").format("owl")[0] == "a photo of a owl."


# ----------------------------------------------------------------------------- templates and names
def test_templates_and_imagenet_names(tmp_path):
    t80, simple = load_templates("imagenet80"), load_templates("simple")
    assert len(t80.templates) == 80 and t80.templates[0] == "a bad photo of a {}." and len(simple.templates) == 7
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and len(set(names)) == 998
    # Identical to the official lists: the sha256 prefixes of the newline-joined official lists.
    assert t80.sha256.startswith("4f976686")
    assert hashlib.sha256("\n".join(names).encode()).hexdigest().startswith("571ae1c5")
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\na photo of a {}.\n\n{} in the wild\n")
    assert load_templates(str(f)).templates == ("a photo of a {}.", "{} in the wild")
    f.write_text("a photo without placeholder\n")
    with pytest.raises(TemplateError, match="no '{}' placeholder"):
        load_templates(str(f))
    with pytest.raises(TemplateError, match="neither"):
        load_templates(str(tmp_path / "missing.txt"))


def test_class_name_resolution(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    names, src = resolve_classnames(wnids)
    assert src == "imagenet-1k" and names == imagenet_classnames()
    assert resolve_classnames(["golden_retriever", "tabby"]) == (["golden retriever", "tabby"], "folder-names")
    assert resolve_classnames(wnids[:5])[1] == "folder-names"  # not the full 1000: no guessing
    # <index>_<name> folders (as MNIST-style exports name them): the index is not part of the name
    assert folder_classnames(["0_zero", "3_three", "9_ankle boot"]) == ["zero", "three", "ankle boot"]
    assert folder_classnames(["0_t_shirt", "10_bag"]) == ["t shirt", "bag"]
    assert folder_classnames(["3_three", "cat"]) == ["3 three", "cat"]  # mixed layouts are left as they are
    assert folder_classnames(["7up", "3"]) == ["7up", "3"]
    lines = tmp_path / "names.txt"
    lines.write_text("dog\ncat\n\n")
    assert resolve_classnames(["a", "b"], str(lines))[0] == ["dog", "cat"]
    with pytest.raises(DataError, match="has 2 names but the data folder has 3"):
        resolve_classnames(["a", "b", "c"], str(lines))
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"a": "Dog", "b": "Cat", "z": "unused"}))
    assert resolve_classnames(["a", "b"], str(mapping))[0] == ["Dog", "Cat"]
    with pytest.raises(DataError, match="no name for folder.*c"):
        resolve_classnames(["a", "c"], str(mapping))


# ----------------------------------------------------------------------------- data folder
def test_folder_scan_bad_images_and_truncation(tmp_path):
    written = make_photo_folder(tmp_path / "data")
    index = scan_image_folder(tmp_path / "data")
    assert index.classes == sorted(["astronaut", "cat", "coffee_mug", "rocket", "camera_man"])
    assert len(index.samples) == len(written["images"]) + 2  # + broken.png + truncated.jpg; notes.txt ignored
    # The truncated JPEG fails with PIL's default but loads as the official loader does.
    trunc = str(written["truncated"][0])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(OSError):
        Image.open(trunc).convert("RGB")
    assert load_rgb(trunc).size == Image.open(written["images"][2]).size
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the switch is not left on globally
    ds = folder_dataset(index, lambda im: torch.zeros(3, 4, 4))
    batch = collate_skip([ds[i] for i in range(len(ds))])
    bad = [index.samples[i][0] for i, _ in batch.failures]
    assert bad == [str(written["corrupt"][0])] and batch.failures[0][1]
    assert batch.images.shape[0] == len(ds) - 1 == len(batch.labels) == len(batch.indices)

    (tmp_path / "data" / "empty_class").mkdir()
    with pytest.raises(DataError, match="without images.*empty_class"):
        scan_image_folder(tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


# ----------------------------------------------------------------------------- CLI
def test_hidden_files_and_folders_are_not_data(tmp_path):
    """.ipynb_checkpoints / .git folders are no class (one would shift every class index after it) and
    .DS_Store / ._* AppleDouble files no image, at the top and below; the order is torchvision's otherwise."""
    from msclip.eval.imagefolder import scan_images

    written = make_photo_folder(tmp_path / "data")
    before = scan_image_folder(tmp_path / "data")
    photo = written["images"][0].read_bytes()
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "data" / ".ipynb_checkpoints" / "a.jpg").write_bytes(photo)
    for cls in before.classes:
        (tmp_path / "data" / cls / "._a.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
        (tmp_path / "data" / cls / ".cache").mkdir()
        (tmp_path / "data" / cls / ".cache" / "b.jpg").write_bytes(photo)
    after = scan_image_folder(tmp_path / "data")
    assert after.classes == before.classes and after.samples == before.samples
    assert scan_images(tmp_path / "data") == sorted(p for p, _ in before.samples)


def test_a_skip_reason_has_no_file_object_repr(tmp_path):
    """PIL's "<_io.BufferedReader name=...>" / "<_io.BytesIO object at 0x..>" is dropped from skip reasons."""
    from msclip.transforms import decode_error_text

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(Exception) as info, open(tmp_path / "bad.jpg", "rb") as f:
        Image.open(f)
    assert "BufferedReader" in str(info.value)
    assert decode_error_text(info.value) == "UnidentifiedImageError: cannot identify image file"


def test_cli_report_on_photos(tmp_path, capsys):
    make_photo_folder(tmp_path / "data")
    out = tmp_path / "res" / "result.json"
    rc = zs_cmd.main(["--model", "clip-b32-tiny", "--data", str(tmp_path / "data"), "--templates", "simple",
                      "--batch-size", "3", "--workers", "1", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["images"] == 12 and rep["images_scored"] == 11
    assert rep["skipped_count"] == 1 and rep["skipped"][0]["path"].endswith("broken.png")
    assert rep["data"]["classes"] == 5 and rep["data"]["class_names_source"] == "folder-names"
    assert [c["name"] for c in rep["per_class"]][:3] == ["astronaut", "camera man", "cat"]
    assert sum(c["images"] for c in rep["per_class"]) == 11
    for key in ("top1_pct", "top5_pct", "mean_per_class_recall_pct"):
        assert 0.0 <= rep[key] <= 100.0
    assert rep["top5_pct"] == 100.0 and rep["top5_k"] == 5  # 5 classes: every class is in the top 5
    assert rep["templates"]["name"] == "simple" and rep["templates"]["count"] == 7
    assert rep["model"]["spec"] == "clip-b32-tiny" and rep["random_weights"] and rep["checkpoint"] is None
    assert rep["timing"]["images_per_second"] > 0 and rep["precision"] == "fp32"
    stdout = capsys.readouterr().out
    assert "top-1" in stdout and "broken.png" in stdout and "camera man" in stdout
    assert [f.name for f in out.parent.iterdir()] == ["result.json"]  # the atomic write left no temp file
    assert "top-1" in stdout and "top-5" in stdout


def test_cli_report_on_one_class_shows_top_1_once(tmp_path, capsys):
    """With one class top-k is clamped to 1: the summary line shows top-1 once, not "top-1 ... top-1"."""
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 120, 40)).save(tmp_path / "data" / "cat" / "a.png")
    assert zs_cmd.main(["--model", "clip-b32-tiny", "--data", str(tmp_path / "data"), "--templates", "simple",
                        "--workers", "0", "--device", "cpu", "--output", str(tmp_path / "r.json")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("top-1"))
    assert line.count("top-") == 1 and "mean per-class recall" in line


def test_cli_imagenet_folder_and_checkpoint(tmp_path):
    """A 1000-wnid folder gets the ImageNet names; --pretrained is loaded and recorded."""
    model = msclip.create_model("clip-b32-tiny")
    ckpt = tmp_path / "tiny.safetensors"
    msclip.save_pretrained(model, ckpt)
    img = tmp_path / "one.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    root = tmp_path / "val"
    for i in range(1000):
        (root / f"n{i:08d}").mkdir(parents=True)
        (root / f"n{i:08d}" / "x.png").hardlink_to(img)
    tfile = tmp_path / "t.txt"
    tfile.write_text("a photo of a {}.\n")
    out = tmp_path / "r.json"
    rc = zs_cmd.main(["--model", "clip-b32-tiny", "--pretrained", str(ckpt), "--data", str(root),
                      "--templates", str(tfile), "--batch-size", "250", "--text-batch-size", "500",
                      "--workers", "0", "--output", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["data"]["class_names_source"] == "imagenet-1k" and rep["per_class"][0]["name"] == "tench"
    assert rep["images_scored"] == 1000 and not rep["random_weights"]
    assert rep["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["missing_ckpt", "names_mismatch", "empty_class", "ckpt_mismatch", "bad_templates"])
def test_cli_bad_input_fails_before_work(tmp_path, capsys, case):
    make_photo_folder(tmp_path / "data", size=32, corrupt=False)
    argv = ["--model", "clip-b32-tiny", "--data", str(tmp_path / "data"), "--device", "cpu", "--workers", "0",
            "--output", str(tmp_path / "r.json")]
    expect = {"missing_ckpt": "does not exist", "names_mismatch": "has 2 names but the data folder has 5",
              "empty_class": "without images", "ckpt_mismatch": "cannot load checkpoint",
              "bad_templates": "neither"}[case]
    if case == "missing_ckpt":
        argv += ["--pretrained", str(tmp_path / "nope.pt")]
    elif case == "names_mismatch":
        (tmp_path / "n.txt").write_text("a\nb\n")
        argv += ["--classnames", str(tmp_path / "n.txt")]
    elif case == "empty_class":
        (tmp_path / "data" / "zebra").mkdir()
    elif case == "ckpt_mismatch":
        other = tmp_path / "other.safetensors"
        msclip.save_pretrained(msclip.create_model("msclip-s-b32-tiny"), other)
        argv += ["--pretrained", str(other)]
    else:
        argv += ["--templates", "imagenet81"]
    assert zs_cmd.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expect in err
    assert not (tmp_path / "r.json").exists()


def test_command_is_discovered_by_cli():
    from msclip.cli import build_parser

    args = build_parser().parse_args(["zeroshot", "--model", "clip-b32-tiny", "--data", "x"])
    assert args._run is zs_cmd.run and args.templates == "imagenet80"
