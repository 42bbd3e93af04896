"""Deployment exports: ONNX graphs of both encoders checked with ONNX Runtime (CPU) against the torch model
on real photos and captions, dynamic batch and trimmed text; `torch.export` programs checked against eager."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch

import msclip

ort = pytest.importorskip("onnxruntime", reason="ONNX export checks need the optional 'export' extra "
                                                "(pip install 'msclip[export]': onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnx", reason="ONNX export checks need the 'export' extra (onnx)")
pytest.importorskip("onnxscript", reason="ONNX export checks need the 'export' extra (onnxscript)")
skdata = pytest.importorskip("skimage.data", reason="the real photos come from scikit-image (the 'dev' extra)")

import msclip.export.onnx as export_onnx_module  # noqa: E402
from msclip.export import export_encoders  # noqa: E402
from msclip.export.onnx import FILES, onnx_sessions, run_onnx  # noqa: E402

# plain CLIP, MS-CLIP (shared attention + MLP), MS-CLIP-S (conv stem, parallel branch, lateral adapters)
# ONNX (about 15 s of conversion per config): MS-CLIP-S, whose graphs hold every part plain CLIP has and more
# (shared trunk, conv stem, parallel branch, lateral adapters); plain CLIP is checked through torch.export below
NAMES = ["msclip-s-b32-tiny"]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
CAPTIONS = ["a photo of an astronaut", "a cup of coffee on a saucer", "a ginger cat", "a rocket on the launch pad"]
LONG = "a very long caption that does not fit into the context window " * 8  # truncation (eot / hard rule)
TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def photos(model) -> torch.Tensor:
    from PIL import Image

    from msclip.transforms import image_transform

    tf = image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)
    return torch.stack([tf(Image.fromarray(getattr(skdata, n)())) for n in PHOTOS])


@pytest.fixture(scope="module", params=NAMES)
def exported(request, tmp_path_factory):
    """One export per config through the `msclip export` command (export + its own ONNX Runtime check).
    The command's torch.export step is handed the programs made here, so the torch.export test reuses them
    instead of tracing every encoder twice (the ONNX conversion and the check run for real)."""
    from msclip.cli import main

    name = request.param
    torch.manual_seed(0)
    model = msclip.create_model(name)
    with torch.no_grad():  # trained-looking weights: not the tiny init, and BN statistics off their defaults
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(name) / "model"
    msclip.save_pretrained(model, folder)
    programs = export_encoders(model)
    out = folder.parent / "onnx"
    used = []
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as printed:
        mp.setattr(export_onnx_module, "export_encoders", lambda m: used.append(m) or programs)
        rc = main(["export", "--model", str(folder), "--format", "onnx", "--output", str(out)])
    assert used, "the command did not go through export_encoders"
    return {"name": name, "model": model, "programs": programs, "dir": out, "rc": rc,
            "printed": printed.getvalue(), "sessions": onnx_sessions(out)}


def test_command_exports_and_checks(exported):
    assert exported["rc"] == 0, exported["printed"]
    assert "ONNX Runtime vs torch, max abs diff" in exported["printed"]
    assert sorted(p.name for p in exported["dir"].iterdir()) == sorted([*FILES.values(), "preprocess.json"])


def test_onnx_matches_torch_on_photos_and_captions(exported):
    model, sessions = exported["model"], exported["sessions"]
    images = photos(model)  # batch 4; the graphs were traced at batch 2
    tokens = msclip.get_tokenizer(model.cfg)(CAPTIONS + [LONG])  # full context length, one truncated
    with torch.no_grad():
        ref_image = model.encode_image(images)
        ref_text = model.encode_text(tokens)  # the model's own path (it trims)
    # real inputs give distinct features, so agreement is not the agreement of constants
    assert (ref_image[0] - ref_image[1]).abs().max() > 100 * TOL and (ref_text[0] - ref_text[1]).abs().max() > 100 * TOL
    got_image, got_text = run_onnx(sessions, "image", images), run_onnx(sessions, "text", tokens)
    assert got_image.shape == tuple(ref_image.shape) and got_text.shape == tuple(ref_text.shape)
    assert np.abs(got_image - ref_image.numpy()).max() <= TOL
    assert np.abs(got_text - ref_text.numpy()).max() <= TOL


def test_onnx_dynamic_batch_and_trimmed_text(exported):
    model, sessions = exported["model"], exported["sessions"]
    g = torch.Generator().manual_seed(3)
    size = model.cfg.vision.image_size
    tokens = msclip.get_tokenizer(model.cfg)(CAPTIONS[:3])
    longest = int(tokens.argmax(-1).max()) + 1
    with torch.no_grad():
        for batch in (1, 3):
            images = torch.randn(batch, 3, size, size, generator=g)
            assert np.abs(run_onnx(sessions, "image", images) - model.encode_image(images).numpy()).max() <= TOL
        ref = model.encode_text(tokens, trim=False).numpy()  # the full context length
    for length in (longest, longest + 1, model.cfg.text.context_length):  # trimmed inputs: any length >= longest
        got = run_onnx(sessions, "text", tokens[:, :length])
        assert np.abs(got - ref).max() <= TOL, length
    assert np.abs(run_onnx(sessions, "text", tokens[:1, :longest]) - ref[:1]).max() <= TOL  # batch 1
    with pytest.raises(Exception):  # longer than the context has no positions
        run_onnx(sessions, "text", torch.zeros(1, model.cfg.text.context_length + 1, dtype=torch.long))


def test_torch_export_matches_eager(exported):
    model, programs = exported["model"], exported["programs"]
    g = torch.Generator().manual_seed(4)
    size = model.cfg.vision.image_size
    images = torch.randn(3, 3, size, size, generator=g)
    tokens = msclip.get_tokenizer(model.cfg)(CAPTIONS[:3] + [LONG])
    with torch.no_grad():
        torch.testing.assert_close(programs["image"].module()(images), model.encode_image(images), rtol=0, atol=1e-5)
        ref = model.encode_text(tokens, trim=False)
        torch.testing.assert_close(programs["text"].module()(tokens), ref, rtol=0, atol=1e-5)
        trimmed = model.trim_tokens(tokens[:3])
        torch.testing.assert_close(programs["text"].module()(trimmed), ref[:3], rtol=0, atol=1e-5)


def test_torch_export_of_plain_clip_matches_eager():
    """The other end of the spectrum (no sharing, patchify stem): its torch.export programs, which the ONNX
    conversion starts from, give eager's features for another batch size and trimmed text."""
    torch.manual_seed(0)
    model = msclip.create_model("clip-b32-tiny")
    programs = export_encoders(model)
    size = model.cfg.vision.image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    tokens = msclip.get_tokenizer(model.cfg)(CAPTIONS[:3])
    with torch.no_grad():
        torch.testing.assert_close(programs["image"].module()(images), model.encode_image(images), rtol=0, atol=1e-5)
        trimmed = model.trim_tokens(tokens)
        torch.testing.assert_close(programs["text"].module()(trimmed), model.encode_text(tokens), rtol=0, atol=1e-5)


def test_preprocess_json_describes_the_inputs(exported):
    model, cfg = exported["model"], exported["model"].cfg
    spec = json.loads((exported["dir"] / "preprocess.json").read_text())
    assert spec["image"]["input_size"] == [cfg.vision.image_size] * 2
    assert spec["image"]["mean"] == list(cfg.preprocess.mean) and spec["image"]["std"] == list(cfg.preprocess.std)
    assert spec["image"]["interpolation"] == cfg.preprocess.interpolation
    assert spec["text"]["tokenizer"] and spec["text"]["context_length"] == cfg.text.context_length
    assert spec["text"]["truncate"] == cfg.text.truncate and spec["embed_dim"] == cfg.embed_dim
    assert spec["logit_scale"] == pytest.approx(model.logit_scale.exp().item())
    sessions = exported["sessions"]
    assert sessions["image"].get_inputs()[0].shape == ["batch", 3, cfg.vision.image_size, cfg.vision.image_size]
    assert sessions["text"].get_inputs()[0].shape == ["batch", "seq"]
    assert sessions["text"].get_outputs()[0].shape == ["batch", cfg.embed_dim]
    # the image pipeline written in the JSON, done by hand (PIL + numpy), gives the transform's tensor
    from PIL import Image

    photo = Image.fromarray(skdata.chelsea())
    s = spec["image"]["input_size"][0]
    w, h = photo.size
    photo = photo.resize((round(w * s / h), s) if w >= h else (s, round(h * s / w)), Image.BICUBIC)
    left, top = (photo.size[0] - s) // 2, (photo.size[1] - s) // 2
    x = np.asarray(photo.crop((left, top, left + s, top + s)), dtype=np.float32) / 255
    x = ((x - spec["image"]["mean"]) / spec["image"]["std"]).transpose(2, 0, 1)[None].astype(np.float32)
    ref = photos(model)[2:3].numpy()
    assert np.abs(x - ref).mean() < 0.05  # PIL vs torchvision resize rounding only


def test_missing_onnx_packages_are_a_clear_error(monkeypatch, tmp_path):
    import sys

    from msclip.export.onnx import ExportError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ExportError, match=r"msclip\[export\].*onnxruntime is not installed"):
        onnx_sessions(tmp_path)


def test_a_failed_onnx_export_leaves_the_earlier_one_whole(monkeypatch, tmp_path):
    """The graphs and preprocess.json are written together: the text graph's conversion failing after the
    image graph's was written leaves every file of the earlier export as it was, and no temporaries."""
    import onnx

    model = msclip.create_model("clip-b32-tiny")
    out = tmp_path / "onnx"
    out.mkdir()
    earlier = {name: f"earlier {name}".encode() for name in [*FILES.values(), "preprocess.json"]}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    converted = []

    class Converted:
        model_proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))

    def fake_export(program, args, **kw):
        if converted:  # the second graph (the text encoder) fails, as a full disk or Ctrl-C would
            raise KeyboardInterrupt
        converted.append(program)
        return Converted()

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    with pytest.raises(KeyboardInterrupt):
        export_onnx_module.export_onnx(model, out, programs={"image": "image program", "text": "text program"})
    assert converted == ["image program"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
