"""clip-b32 / clip-b16 are open_clip's ViT-B-*-quickgelu: same weights in, same tokens and features out."""
import pytest
import torch

import msclip
from msclip.checkpoint import convert_state_dict

open_clip = pytest.importorskip("open_clip")
skdata = pytest.importorskip("skimage.data")

TEXTS = ["a photo of an astronaut", "a cup of coffee", "a cat", "", "long " * 100 + "caption"]


@pytest.fixture(scope="module")
def photos():
    from PIL import Image

    return [Image.fromarray(getattr(skdata, n)()) for n in ("astronaut", "coffee", "chelsea")]


@pytest.mark.parametrize("ours, theirs", [("clip-b32", "ViT-B-32-quickgelu"), ("clip-b16", "ViT-B-16-quickgelu")])
def test_same_weights_same_outputs(ours, theirs, photos, tmp_path):
    torch.manual_seed(0)
    ref, _, ref_preprocess = open_clip.create_model_and_transforms(theirs)
    ref.eval()
    # the conversion `pretrained=` applies, in memory: a 600 MB file per model would make the suite need GBs
    # of free disk (the file path itself is checked below, on a small twin)
    model, _, preprocess = msclip.create_model_and_transforms(ours)
    model.load_state_dict(convert_state_dict(ref.state_dict(), model, source=theirs), strict=True)
    model.eval()

    tokens = msclip.get_tokenizer(ours)(TEXTS)
    assert torch.equal(tokens, open_clip.get_tokenizer(theirs)(TEXTS))
    images = torch.stack([preprocess(p) for p in photos])
    torch.testing.assert_close(images, torch.stack([ref_preprocess(p) for p in photos]), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)
    # forward()'s scale is exp(logit_scale) on both sides (test_contracts checks forward against the encoders)
    torch.testing.assert_close(model.logit_scale.exp(), ref.logit_scale.exp())


def test_an_open_clip_file_loads_through_pretrained(tmp_path):
    """An open_clip state_dict saved with torch.save, given as `pretrained=`: same features as open_clip's
    model (a CLIP with clip-b32-tiny's shapes, built by open_clip itself)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = msclip.get_model_config("clip-b32-tiny")
    v, t = cfg.vision, cfg.text
    ref = CLIP(cfg.embed_dim, quick_gelu=True,
               vision_cfg=CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads,
                                        mlp_ratio=v.mlp_ratio, patch_size=v.patch_size, image_size=v.image_size),
               text_cfg=CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                                    heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_ratio)).eval()
    torch.save(ref.state_dict(), tmp_path / "open_clip.pt")
    model = msclip.create_model("clip-b32-tiny", pretrained=tmp_path / "open_clip.pt")
    images = torch.randn(2, 3, v.image_size, v.image_size)
    tokens = msclip.get_tokenizer("clip-b32-tiny")(TEXTS[:3])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens), atol=1e-5, rtol=0)
