"""The sharing spectrum: declared shared/specific sets, honest counts, gradients from both modalities."""
import pytest
import torch

import msclip
from msclip.config import COMPONENTS
from msclip.model import MSCLIP

SPECTRUM = ["clip-b32-t768", "msclip-b32-attn", "msclip-b32-mlp", "msclip-b32", "msclip-b32-all"]
EXPECTED_SHARED = {
    "clip-b32": set(), "clip-b32-t768": set(), "msclip-b32-attn": {"attn_in", "attn_out"}, "msclip-b32-mlp": {"mlp"},
    "msclip-b32": {"attn_in", "attn_out", "mlp"}, "msclip-b32-all": set(COMPONENTS),
    "msclip-s-b32": {"attn_in", "attn_out", "mlp"},
}


def meta(name):
    with torch.device("meta"):
        return MSCLIP(msclip.get_model_config(name))


@pytest.mark.parametrize("name", sorted(EXPECTED_SHARED))
def test_declared_shared_sets(name):
    model = meta(name)
    for layer, block in enumerate(model.trunk.blocks):
        for comp in COMPONENTS:
            keys = set(getattr(block, comp).keys())
            early = name.startswith("msclip-s") and layer == 0
            if comp in EXPECTED_SHARED[name] and not early:
                assert keys == {"shared"}, (name, layer, comp)
            else:
                assert keys == ({"text"} if early else {"image", "text"}), (name, layer, comp)


@pytest.mark.parametrize("name", sorted(EXPECTED_SHARED))
def test_one_name_per_tensor_and_honest_count(name):
    model = msclip.create_model(name + "-tiny")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    ptrs = [p.data_ptr() for p in model.state_dict().values() if p.numel()]
    assert len(ptrs) == len(set(ptrs))  # no tensor aliased under two state_dict names
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    groups = model.param_modality()
    assert (counts["shared"] > 0) == bool(EXPECTED_SHARED[name])
    assert all((".shared." in n) == (g == "shared") for n, g in groups.items())


def test_count_shrinks_along_spectrum():
    totals = [sum(p.numel() for p in meta(n).parameters()) for n in SPECTRUM]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals), totals


def test_shared_modules_serve_both_modalities():
    model = msclip.create_model("msclip-s-b32-tiny")
    block = model.trunk.blocks[2]
    assert block.part("mlp", "image") is block.part("mlp", "text")
    assert block.part("ln_1", "image") is not block.part("ln_1", "text")


@pytest.mark.parametrize("name", ["msclip-s-b32-tiny", "msclip-b32-all-tiny"])
def test_text_backward_reaches_shared_not_image(name):
    model = msclip.create_model(name).train()
    tokens = msclip.get_tokenizer(name)(["a photo of a dog", "a cat"])
    model.encode_text(tokens).sum().backward()
    groups = model.param_modality()
    for pname, p in model.named_parameters():
        if groups[pname] == "image":
            assert p.grad is None, pname
        elif groups[pname] == "shared":
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_gradients_from_both_modalities_accumulate():
    model = msclip.create_model("msclip-b32-tiny").train()
    w = model.trunk.blocks[1].mlp["shared"].c_fc.weight
    images = torch.randn(2, 3, 64, 64)
    tokens = msclip.get_tokenizer("msclip-b32-tiny")(["a dog", "a cat"])
    model.encode_image(images).sum().backward()
    g_img = w.grad.clone()
    model.zero_grad()
    model.encode_text(tokens).sum().backward()
    g_txt = w.grad.clone()
    model.zero_grad()
    (model.encode_image(images).sum() + model.encode_text(tokens).sum()).backward()
    torch.testing.assert_close(w.grad, g_img + g_txt, atol=1e-6, rtol=1e-5)
