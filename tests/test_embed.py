"""`msclip embed`: image / text embeddings written with their names, corrupt images skipped."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msclip
from msclip.commands import embed as embed_cmd
from msclip.eval.imagefolder import load_rgb
from msclip.transforms import image_transform

from image_folder_utils import make_photo_folder

TEXTS = ["a photo of a cat", "", "an astronaut on the moon", "a cup of coffee",
         "a very " + "very " * 60 + "long caption about a rocket"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    torch.manual_seed(0)
    msclip.save_pretrained(msclip.create_model("clip-b32-tiny"), path)
    return path


def _model(ckpt):
    return msclip.create_model("clip-b32-tiny", pretrained=str(ckpt))


def test_embed_images_npy(tmp_path, ckpt, capsys):
    written = make_photo_folder(tmp_path / "imgs")
    out = tmp_path / "emb" / "images.npy"
    rc = embed_cmd.main(["--model", "clip-b32-tiny", "--pretrained", str(ckpt), "--images", str(tmp_path / "imgs"),
                         "--output", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    emb = np.load(out)
    meta = json.loads((tmp_path / "emb" / "images.json").read_text())
    assert emb.dtype == np.float32 and emb.shape == (len(written["images"]) + 1, 32)  # + truncated.jpg
    assert meta["count"] == emb.shape[0] == len(meta["names"]) and meta["kind"] == "images"
    assert meta["skipped_count"] == 1 and meta["skipped"][0]["path"].endswith("broken.png")
    assert "cat/broken.png" not in meta["names"] and "cat/truncated.jpg" in meta["names"]
    assert meta["checkpoint"]["path"] == str(ckpt)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Row i is the embedding of names[i].
    model = _model(ckpt)
    tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)
    i = meta["names"].index("rocket/rocket_1.png")
    with torch.no_grad():
        ref = model.encode_image(tf(load_rgb(str(tmp_path / "imgs" / "rocket" / "rocket_1.png")))[None], normalize=True)
    np.testing.assert_allclose(emb[i], ref[0].numpy(), atol=1e-5)
    assert "broken.png" in capsys.readouterr().out


def test_embed_texts_safetensors_fp32_and_bf16(tmp_path, ckpt):
    from safetensors import safe_open

    src = tmp_path / "captions.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    model = _model(ckpt)
    tok = msclip.get_tokenizer("clip-b32-tiny")
    with torch.no_grad():
        ref = model.encode_text(tok(TEXTS), normalize=True, trim=False)
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"texts_{precision}.safetensors"
        rc = embed_cmd.main(["--model", "clip-b32-tiny", "--pretrained", str(ckpt), "--texts", str(src),
                             "--output", str(out), "--batch-size", "2", "--precision", precision, "--no-progress"])
        assert rc == 0
        with safe_open(str(out), framework="pt") as f:
            emb = f.get_tensor("embeddings")
            assert f.metadata()["kind"] == "texts"
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["names"] == TEXTS and meta["dtype"] == ("float32" if precision == "fp32" else "bfloat16")
        if precision == "fp32":
            assert emb.dtype == torch.float32
            torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)  # input order kept despite length sorting
        else:
            assert emb.dtype == torch.bfloat16
            assert torch.nn.functional.cosine_similarity(emb.float(), ref).min() > 0.99


def test_embed_bad_arguments(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello\n")
    assert embed_cmd.main(["--model", "clip-b32-tiny", "--texts", str(tmp_path / "t.txt"),
                           "--output", str(tmp_path / "x.csv")]) == 2
    assert "must end in .npy or .safetensors" in capsys.readouterr().err
    assert embed_cmd.main(["--model", "clip-b32-tiny", "--images", str(tmp_path / "none"),
                           "--output", str(tmp_path / "x.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()
