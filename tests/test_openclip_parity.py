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
    if ours == "clip-b32":  # through a file, as a user would; then the 600 MB file goes at once
        torch.save(ref.state_dict(), tmp_path / "open_clip.pt")
        model, _, preprocess = msclip.create_model_and_transforms(ours, pretrained=tmp_path / "open_clip.pt")
        (tmp_path / "open_clip.pt").unlink()
    else:  # the same conversion, in memory
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
        ours_out, ref_out = model(images, tokens), ref(images, tokens)
    torch.testing.assert_close(ours_out["logit_scale"], ref_out[2])  # open_clip: (img, txt, scale)
