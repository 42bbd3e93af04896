"""Audit of the model core (model, trunk, layers, stems, parallel branch, convert, official yaml, factory):
config fields that must reach the model, seeded initialisation, per-modality heads, sharing seen through the
outputs, text padding, train/eval BatchNorm behaviour, normalisation flags and the temperature, the official
key map's reports, and clear errors on bad input. Tiny configs only, one thread."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msclip
from msclip.config import ConfigError, ModelCfg
from msclip.convert import CheckpointMismatch, external_names, from_official, to_official
from msclip.errors import MsclipError
from msclip.layers import LayerNorm
from msclip.model import MSCLIP
from msclip.official_config import load_official_yaml
from msclip.parallel import BottleneckStage

S = "msclip-s-b32-tiny"
REF_YAML = Path(__file__).parent / "data" / "official_tiny" / "config.yaml"  # copy of the shared reference


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


def cfg_dict(name: str = S) -> dict:
    return msclip.get_model_config(name).to_dict()


def build(d: dict, seed: int = 0, fit: bool = True) -> MSCLIP:
    torch.manual_seed(seed)
    return MSCLIP(ModelCfg.from_dict(d), fit_batchnorm_stats=fit).eval()


def inputs(name: str = S, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = msclip.get_model_config(name)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    tokens = msclip.get_tokenizer(name)(["a photo of a dog", "two cats on a red mat", "x"][:n])
    return images, tokens


# --- initialisation -----------------------------------------------------------------------------------------

def test_same_seed_same_weights_and_bn_fitting_leaves_the_global_rng_alone():
    """A seed fixes every weight; fitting the BatchNorm statistics uses a private generator, so the weights
    and the global RNG stream after construction are those of a model built without it."""
    d = cfg_dict()
    a = build(d, seed=5)
    after_a = torch.rand(4)
    b = build(d, seed=5)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    plain = build(d, seed=5, fit=False)
    after_plain = torch.rand(4)
    assert torch.equal(after_a, after_plain)
    differs = {k for k, v in a.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert differs and all(k.endswith(("running_mean", "running_var")) for k in differs), sorted(differs)[:5]
    assert all(int(t) == 0 for k, t in a.state_dict().items() if k.endswith("num_batches_tracked"))
    other = build(d, seed=6)
    assert not torch.equal(other.image.proj, a.image.proj)


def test_init_follows_the_official_scales():
    """Official init (spec section 8): D^-1/2 normal class/pos embeddings and image proj, xavier in_proj,
    std 0.02 linears and convs, zero biases, LN/BN affine 1/0; logit_scale from the config."""
    d = cfg_dict()
    d["init_logit_scale"] = 0.25
    m = build(d)
    width = m.cfg.vision.width
    for t in (m.image.class_embedding, m.image.positional_embedding, m.image.proj):
        assert abs(t.std().item() - width ** -0.5) < 0.25 * width ** -0.5
    attn_in = m.trunk.blocks[2].attn_in["shared"].weight
    bound = (6 / (width + 3 * width)) ** 0.5
    assert attn_in.abs().max() <= bound and attn_in.abs().max() > 0.9 * bound  # xavier uniform
    fc = m.trunk.blocks[2].mlp["shared"].c_fc
    assert abs(fc.weight.std().item() - 0.02) < 0.004 and fc.bias.abs().max() == 0
    assert abs(m.image.stem.stages[3].conv1.weight.std().item() - 0.02) < 0.004
    assert m.logit_scale.item() == 0.25


# --- config fields that must change the model ---------------------------------------------------------------

def test_every_layernorm_uses_norm_eps_and_batchnorm_eps_follow_the_release():
    """TF-LN eps everywhere = cfg.norm_eps; BN eps 1e-5 except the parallel bottlenecks' (the config's)."""
    d = cfg_dict()
    d["norm_eps"] = 3e-9
    d["parallel"]["bottleneck_bn_eps"] = 7e-7
    m = build(d, fit=False)
    norms = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, LayerNorm)]
    assert len(norms) > 20 and any(n.startswith("image.parallel.adapters") for n, _ in norms)
    assert all(isinstance(mod, LayerNorm) for n, mod in m.named_modules() if isinstance(mod, nn.LayerNorm))
    assert {n: mod.eps for n, mod in norms} == {n: 3e-9 for n, _ in norms}
    bottleneck = {n for n, mod in m.named_modules() if isinstance(mod, BottleneckStage)}
    for n, mod in m.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            inside = any(n.startswith(b + ".") for b in bottleneck)
            assert mod.eps == (7e-7 if inside else 1e-5), n


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_head_counts_are_per_modality_and_used(tower):
    """Same weights, another head count of one tower: that tower's features change, the other's do not
    (the shared attention projections are split into each modality's own number of heads)."""
    images, tokens = inputs()
    base = build(cfg_dict())
    d = cfg_dict()
    d[tower]["heads"] = 1 if d[tower]["heads"] != 1 else 2
    other = build(d, fit=False)
    other.load_state_dict(base.state_dict())
    with torch.no_grad():
        img = (base.encode_image(images), other.encode_image(images))
        txt = (base.encode_text(tokens), other.encode_text(tokens))
    changed, same = (img, txt) if tower == "vision" else (txt, img)
    assert (changed[0] - changed[1]).abs().max() > 1e-3
    torch.testing.assert_close(same[0], same[1], atol=0, rtol=0)


def test_conv_stem_first_kernel_and_text_mlp_ratio_reach_the_model():
    d = cfg_dict()
    d["vision"]["stem_first_kernel"] = 7
    m = build(d, fit=False)
    assert m.image.stem.conv1.kernel_size == (7, 7) and m.image.stem.conv1.padding == (3, 3)
    images, _ = inputs()
    with torch.no_grad():
        assert m.encode_image(images).shape == (3, m.cfg.embed_dim)
    d = cfg_dict("clip-b32-tiny")
    d["text"]["mlp_ratio"] = 2.0
    m = build(d, fit=False)
    assert m.trunk.blocks[0].mlp["text"].c_fc.out_features == 2 * m.cfg.text.width
    assert m.trunk.blocks[0].mlp["image"].c_fc.out_features == 4 * m.cfg.vision.width


# --- sharing, seen through the outputs ----------------------------------------------------------------------

def _outputs(m, images, tokens):
    with torch.no_grad():
        return m.encode_image(images), m.encode_text(tokens)


@pytest.mark.parametrize("param, moves", [
    ("trunk.blocks.2.mlp.shared.c_fc.weight", {"image", "text"}),
    ("trunk.blocks.3.attn_in.shared.weight", {"image", "text"}),
    ("trunk.blocks.2.ln_1.image.weight", {"image"}),
    ("trunk.blocks.2.ln_2.text.bias", {"text"}),
    ("trunk.blocks.0.mlp.text.c_proj.weight", {"text"}),  # text-only block 0 (the stem took the image's slot)
    ("image.parallel.adapters.1.t2b_pw.weight", {"image"}),
])
def test_a_parameter_moves_exactly_the_modalities_that_use_it(param, moves):
    m = build(cfg_dict())
    images, tokens = inputs()
    before = _outputs(m, images, tokens)
    with torch.no_grad():
        p = dict(m.named_parameters())[param]
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    after = _outputs(m, images, tokens)
    moved = {mod for mod, a, b in zip(("image", "text"), before, after) if not torch.equal(a, b)}
    assert moved == moves


# --- text padding and masks ---------------------------------------------------------------------------------

def test_tokens_after_eot_cannot_change_the_features():
    """Causal text, pooled at EOT: any ids after EOT (not only the pad id 0), trimmed or not, give the same
    features; so does a batch already cut to its longest caption and passed with trim=False."""
    m = build(cfg_dict())
    _, tokens = inputs()
    noisy = tokens.clone()
    eot = tokens.argmax(-1)
    junk = torch.randint(1, 49000, tokens.shape, generator=torch.Generator().manual_seed(2))
    after = torch.arange(tokens.shape[1])[None] > eot[:, None]
    noisy[after] = junk[after]
    with torch.no_grad():
        ref = m.encode_text(tokens, trim=False)
        torch.testing.assert_close(m.encode_text(noisy, trim=False), ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(m.encode_text(noisy), ref, atol=2e-6, rtol=0)
        cut = m.trim_tokens(tokens)
        torch.testing.assert_close(m(tokens=cut, trim=False)["text_features"], m(tokens=tokens)["text_features"],
                                   atol=2e-6, rtol=0)


# --- train / eval -------------------------------------------------------------------------------------------

def test_train_forward_updates_every_batchnorm_and_eval_forward_touches_nothing():
    m = build(cfg_dict())
    images, tokens = inputs(n=3)
    norms = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    assert any(".parallel." in n for n in norms) and any(".stem." in n for n in norms)
    start = {k: v.clone() for k, v in m.named_buffers()}
    with torch.no_grad():
        ev = m(images, tokens)
        assert all(torch.equal(v, start[k]) for k, v in m.named_buffers())
        m.train()
        tr = m(images, tokens)
    for n, bn in norms.items():
        assert int(bn.num_batches_tracked) == 1, n
        assert not torch.equal(bn.running_mean, start[f"{n}.running_mean"]), n
        assert not torch.equal(bn.running_var, start[f"{n}.running_var"]), n
    # no dropout anywhere: the text (no BatchNorm) is the same in both modes; the image uses batch statistics
    torch.testing.assert_close(tr["text_features"], ev["text_features"], atol=0, rtol=0)
    assert (tr["image_features"] - ev["image_features"]).abs().max() > 1e-4


# --- normalisation flags and the temperature ----------------------------------------------------------------

def test_normalise_flags_and_unclamped_temperature():
    m = build(cfg_dict())
    images, tokens = inputs()
    with torch.no_grad():
        img, txt = m.encode_image(images), m.encode_text(tokens)
        torch.testing.assert_close(m.encode_image(images, normalize=True), F.normalize(img, dim=-1))
        torch.testing.assert_close(m.encode_text(tokens, normalize=True), F.normalize(txt, dim=-1))
        assert (img.norm(dim=-1) - 1).abs().min() > 1e-3  # the default is the raw embedding
        m.logit_scale.fill_(7.5)  # above ln(100): the model itself does not clamp (the trainer may)
        out = m(images, tokens)
    torch.testing.assert_close(out["image_features"], F.normalize(img, dim=-1))
    torch.testing.assert_close(out["text_features"], F.normalize(txt, dim=-1))
    assert out["logit_scale"].item() == pytest.approx(torch.tensor(7.5).exp().item())


def test_create_model_precision_and_device():
    m = msclip.create_model(S, precision="bf16", device="cpu")
    assert not m.training
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert all(b.dtype == (torch.long if k.endswith("num_batches_tracked") else torch.bfloat16)
               for k, b in m.named_buffers())
    images, tokens = inputs()
    with torch.no_grad():
        assert m.encode_image(images).dtype == torch.bfloat16  # fp32 images are cast to the model's dtype
        assert m.encode_text(tokens).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        msclip.create_model(S, precision="fp8")


# --- official key map ---------------------------------------------------------------------------------------

def test_external_names_follow_the_sharing():
    cfg = msclip.get_model_config(S)
    assert external_names("trunk.blocks.4.mlp.shared.c_fc.weight", cfg) == [
        "visual.transformer.resblocks.4.mlp.c_fc.weight", "transformer.resblocks.4.mlp.c_fc.weight"]
    assert external_names("trunk.blocks.4.attn_in.shared.bias", cfg) == [
        "visual.transformer.resblocks.4.attn.in_proj_bias", "transformer.resblocks.4.attn.in_proj_bias"]
    assert external_names("trunk.blocks.0.attn_out.text.weight", cfg) == [
        "transformer.resblocks.0.attn.out_proj.weight"]
    assert external_names("image.stem.stages.2.down_bn.running_var", cfg) == [
        "visual.transformer.resblocks.0.resnet_stage.conv_2.downsample.1.running_var"]
    with pytest.raises(KeyError, match="nope"):
        external_names("nope", cfg)


def test_official_report_names_each_alias_once_in_its_section():
    """One shared tensor: its text alias missing, its image alias of the wrong shape; another key not a
    tensor; an extra key; OpenAI metadata ignored. Each problem once, under its kind, all in one error."""
    m = build(cfg_dict())
    official = dict(to_official(m.state_dict(), m.cfg))
    del official["transformer.resblocks.3.mlp.c_fc.weight"]
    official["visual.transformer.resblocks.3.mlp.c_fc.weight"] = torch.zeros(2)
    official["ln_final.bias"] = [0.0] * 64
    official["visual.bogus"] = torch.zeros(1)
    official["input_resolution"] = 64
    with pytest.raises(CheckpointMismatch) as err:
        from_official(official, m.state_dict(), m.cfg, source="ck.pth")
    msg = str(err.value)
    assert msg.startswith(f"ck.pth does not fit model {S}:")
    assert "missing keys (1):\n    transformer.resblocks.3.mlp.c_fc.weight\n" in msg
    assert "unexpected keys (1):\n    visual.bogus\n" in msg
    assert "wrong shapes or types (2):" in msg and "ln_final.bias: not a tensor (list)" in msg
    assert "visual.transformer.resblocks.3.mlp.c_fc.weight: checkpoint (2,) vs model (256, 64)" in msg
    assert "disagree" not in msg and "input_resolution" not in msg


def test_official_round_trip_keeps_the_tie():
    """Loading an official state_dict copies into the one shared tensor: both modalities see the loaded values."""
    src = build(cfg_dict(), seed=1)
    dst = build(cfg_dict(), seed=2)
    dst.load_state_dict(from_official(to_official(src.state_dict(), src.cfg), dst.state_dict(), dst.cfg))
    block = dst.trunk.blocks[3]
    assert block.part("mlp", "image") is block.part("mlp", "text")
    images, tokens = inputs()
    a, b = _outputs(src, images, tokens), _outputs(dst, images, tokens)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


# --- real bugs found by the audit (strict xfail: they start failing once fixed) ------------------------------

def test_identical_aliases_with_nan_are_not_a_disagreement():
    m = build(cfg_dict())
    with torch.no_grad():
        m.trunk.blocks[3].mlp["shared"].c_fc.weight[0, 0] = float("nan")
    state = from_official(to_official(m.state_dict(), m.cfg), m.state_dict(), m.cfg)
    assert torch.isnan(state["trunk.blocks.3.mlp.shared.c_fc.weight"][0, 0])


def test_tokens_longer_than_the_context_are_a_clear_error():
    m = build(cfg_dict())
    tokens = msclip.get_tokenizer("clip-b32")(["a dog " * 30])  # context 77, model context 32
    with pytest.raises((ValueError, MsclipError), match="context"):
        m.encode_text(tokens)


@pytest.mark.parametrize("name", [S, "clip-b32-tiny"])
def test_wrong_image_size_is_a_clear_error(name):
    m = build(cfg_dict(name))
    with pytest.raises((ValueError, MsclipError), match="64"):
        m.encode_image(torch.randn(1, 3, 96, 96))


def test_empty_text_batch_gives_empty_features():
    m = build(cfg_dict())
    with torch.no_grad():
        assert m.encode_image(torch.randn(0, 3, 64, 64)).shape == (0, 32)
        assert m.encode_text(torch.zeros(0, 32, dtype=torch.long)).shape == (0, 32)


def test_conv_stem_strides_must_agree_with_patch_size():
    d = cfg_dict("msclip-b32-es-tiny")
    d["vision"]["stem_strides"] = [2, 2, 2, 2]  # total 32, but patch_size is 16
    assert d["vision"]["patch_size"] == 16
    with pytest.raises(ConfigError, match="patch_size"):
        ModelCfg.from_dict(d)


_BAD_YAML_VALUES = [
    ("N_LAYERS: 1", "N_LAYERS: one", "CUSTOM.N_LAYERS"),
    ("PARALLEL_N_LAYERS: 5", "PARALLEL_N_LAYERS: five", "CUSTOM.PARALLEL_N_LAYERS"),
    ("PARALLEL_LATERAL_LAYER: [2, 4, 6, 8, 10]", "PARALLEL_LATERAL_LAYER: 2", "CUSTOM.PARALLEL_LATERAL_LAYER"),
    ("EARLY_CONV_RES_LAYERS: [1, 1, 1, 1]", "EARLY_CONV_RES_LAYERS: [1, 1, 1, 1]\n  EARLY_CONV_RES_STRIDES: 2",
     "CUSTOM.EARLY_CONV_RES_STRIDES"),
    ("IMAGE_SIZE: [128, 128]\nTEST", "IMAGE_SIZE: 128\nTEST", "TRAIN.IMAGE_SIZE"),
    ("WIDTH: 64\n      LAYERS", "WIDTH: '64'\n      LAYERS", "MODEL.SPEC.VISION.WIDTH"),
    ("TRAIN:\n  IMAGE_SIZE: [128, 128]", "TRAIN: [128]", "TRAIN"),
]


@pytest.mark.parametrize("old, new, key", _BAD_YAML_VALUES, ids=[k for _, _, k in _BAD_YAML_VALUES])
def test_mistyped_official_yaml_values_are_config_errors_naming_the_key(tmp_path, old, new, key):
    text = REF_YAML.read_text()
    assert old in text
    path = tmp_path / "m.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_official_yaml(path)
