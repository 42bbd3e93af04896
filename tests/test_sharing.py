"""The sharing spectrum: declared shared/specific sets, honest counts, gradients from both modalities."""
import csv
import math

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
    state = model.state_dict(keep_vars=True)
    ptrs = [t.data_ptr() for t in state.values() if t.numel()]
    assert len(ptrs) == len(set(ptrs))  # no storage aliased under two state_dict names
    # a shared component appears once per layer; a specific one once per modality that runs the layer
    blocks = model.trunk.blocks
    shared_blocks = sum(all(list(getattr(b, c).keys()) == ["shared"] for c in EXPECTED_SHARED[name])
                        for b in blocks) if EXPECTED_SHARED[name] else 0
    assert (model.parameter_counts()["shared"] > 0) == bool(EXPECTED_SHARED[name]) == (shared_blocks > 0)


def _manifest_counts(stem: str) -> dict[str, int]:
    """Unique parameter counts per group from the official code's state_dict manifest (aliases dropped)."""
    from reference_utils import SPEC_MANIFESTS

    counts = {"shared": 0, "image": 0, "text": 0, "other": 0}
    with open(SPEC_MANIFESTS / f"official-manifest-{stem}.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["kind"] == "param" and not row["tied_to"]:
                n = 1 if row["shape"] == "scalar" else math.prod(int(x) for x in row["shape"].split("x"))
                counts["image" if row["group"] == "vision" else row["group"]] += n
    return counts


@pytest.mark.parametrize("name,stem", [("msclip-s-b32", "b32-laion-msclips"), ("msclip-s-b16", "b16-yfcc-msclips")])
def test_counts_match_official_manifest(name, stem):
    """Independent facts: the official model's own state_dict listing, grouped by the official code."""
    counts = meta(name).parameter_counts()
    expected = _manifest_counts(stem)
    assert {g: counts[g] for g in expected} == expected
    assert counts["total"] == sum(expected.values())  # 132,408,001 for msclip-s-b32


def test_hand_counted_tiny_clip():
    """clip-b32-tiny counted by hand from its JSON: width 64 in both towers, 6 layers each, MLP 4x,
    embed 32, 16 px patches on 64 px images (4x4 grid + cls = 17 tokens), vocab 49408, context 32."""
    block = 128 + (12288 + 192) + (4096 + 64) + 128 + (16384 + 256) + (16384 + 64)  # ln_1 attn_in attn_out ln_2 mlp
    assert block == 49984
    image = 3 * 16 * 16 * 64 + 64 + 17 * 64 + 2 * 128 + 64 * 32 + 6 * block  # patch cls pos ln_pre/post proj
    text = 49408 * 64 + 32 * 64 + 128 + 64 * 32 + 6 * block  # token pos ln_final proj
    assert (image, text) == (352512, 3466240)
    counts = msclip.create_model("clip-b32-tiny").parameter_counts()
    assert counts == {"shared": 0, "image": image, "text": text, "other": 1, "total": image + text + 1,
                      "image_encoder": image, "text_encoder": text}


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


# The study's added spectrum points (issue 13): {config: (shared components, layers they are shared at,
# layers only the text runs)} at full size and tiny size (12 / 6 trunk layers). A layer outside the set has
# every component per modality; a text-only layer (the conv stem took the image's slot) has text parts only.
ATTN_MLP = {"attn_in", "attn_out", "mlp"}
LAYER_PLAN = {
    "msclip-b32-es": (ATTN_MLP, lambda n: set(range(1, n)), lambda n: {0}),
    "msclip-b32-pb": (ATTN_MLP, lambda n: set(range(n)), lambda n: set()),
    "msclip-b32-bottom": (ATTN_MLP, lambda n: set(range(n // 2)), lambda n: set()),
    "msclip-b32-top": (ATTN_MLP, lambda n: set(range(n // 2, n)), lambda n: set()),
}


@pytest.mark.parametrize("name", [n + s for n in sorted(LAYER_PLAN) for s in ("", "-tiny")])
def test_study_variants_declare_their_sets(name):
    comps, shared_at, text_only = LAYER_PLAN[name.removesuffix("-tiny")]
    model = meta(name)
    n = len(model.trunk.blocks)
    assert n == (6 if name.endswith("-tiny") else 12)
    for layer, block in enumerate(model.trunk.blocks):
        for comp in COMPONENTS:
            keys = set(getattr(block, comp).keys())
            if layer in text_only(n):
                assert keys == {"text"}, (name, layer, comp)
            elif comp in comps and layer in shared_at(n):
                assert keys == {"shared"}, (name, layer, comp)
            else:
                assert keys == {"image", "text"}, (name, layer, comp)
    # early specialization = the conv stem; the parallel branch only where declared
    assert (model.cfg.vision.stem == "conv") == name.startswith("msclip-b32-es")
    assert (model.cfg.parallel is not None) == name.startswith("msclip-b32-pb")


def test_study_variants_differ_from_msclip_b32_only_where_declared():
    """es = msclip-b32 + the conv stem (its image slot 0 and its block-0 text-only layer); pb = msclip-b32 + the
    parallel branch; bottom/top = msclip-b32 shared on half the layers: the shared count follows."""
    counts = {n: meta(n).parameter_counts() for n in ("msclip-b32", *LAYER_PLAN)}
    per_layer = counts["msclip-b32"]["shared"] // 12
    assert counts["msclip-b32-pb"]["shared"] == counts["msclip-b32"]["shared"]
    assert counts["msclip-b32-pb"]["image"] > counts["msclip-b32"]["image"]  # + branch and adapters
    assert counts["msclip-b32-es"]["shared"] == 11 * per_layer
    assert counts["msclip-b32-bottom"]["shared"] == counts["msclip-b32-top"]["shared"] == 6 * per_layer
