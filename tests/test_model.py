"""Model behaviour on tiny configs: gradients, checkpointing, precision, text trimming, attention maps."""
import pytest
import torch

import msclip

TINY = [m for m in msclip.list_models() if m.endswith("-tiny")]


def batch(name, n=3):
    cfg = msclip.get_model_config(name)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = msclip.get_tokenizer(name)(["a photo of a dog", "two cats on a red mat", "x"][:n])
    return images, tokens


# Gradients for every parameter and gradient checkpointing (engaged, bit-identical) are registry-wide
# contracts: tests/test_contracts.py.


@pytest.mark.parametrize("name", ["msclip-s-b32-tiny", "clip-b32-tiny"])
def test_pre_projection_image_features(name):
    model = msclip.create_model(name)
    images, _ = batch(name)
    with torch.no_grad():
        pre = model.encode_image(images, project=False)
        emb = model.encode_image(images)
    assert pre.shape == (3, model.cfg.vision.width) and emb.shape == (3, model.cfg.embed_dim)
    torch.testing.assert_close(pre @ model.image.proj, emb)  # the embedding is exactly the projected features


def test_text_trim_is_exact():
    model = msclip.create_model("msclip-s-b32-tiny")
    tok = msclip.get_tokenizer("msclip-s-b32-tiny")
    tokens = tok(["a", "a much longer caption with quite a few words in it", ""])
    longest = int((tokens != 0).sum(1).max())  # SOT ... EOT of the longest caption
    assert model.trim_tokens(tokens).shape[1] == longest < tokens.shape[1]  # cut to it, not rounded up
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(tokens, trim=False),
                                   atol=1e-6, rtol=0)


def test_hard_truncated_text_pools_at_sot():
    tok = msclip.get_tokenizer("msclip-s-b32")
    tokens = tok(["word " * 200])
    assert tokens.shape == (1, 77) and 49407 not in tokens[0].tolist() and tokens.argmax() == 0
    eot_tok = msclip.get_tokenizer("clip-b32")(["word " * 200])
    assert eot_tok[0, -1] == 49407


def test_batch_independent_eval():
    model = msclip.create_model("msclip-s-b32-tiny")
    images, tokens = batch("msclip-s-b32-tiny")
    with torch.no_grad():
        full = model.encode_image(images)
        single = torch.cat([model.encode_image(images[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(full, single, atol=1e-5, rtol=0)


def test_bf16_autocast_and_bf16_weights_close_to_fp32():
    model = msclip.create_model("msclip-s-b32-tiny")
    images, tokens = batch("msclip-s-b32-tiny")
    with torch.no_grad():
        ref = model(images, tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(images, tokens)
        bf16 = msclip.create_model("msclip-s-b32-tiny", precision="bf16")
        bf16.load_state_dict(model.state_dict())
        cast = bf16(images.bfloat16(), tokens)
    for out in (amp, cast):
        for key in ("image_features", "text_features"):
            cos = torch.nn.functional.cosine_similarity(out[key].float(), ref[key], dim=-1)
            assert (cos > 0.98).all(), (key, cos)


def test_attention_maps_match_fused_path():
    model = msclip.create_model("msclip-s-b32-tiny")
    images, tokens = batch("msclip-s-b32-tiny")
    layers = (1, 3)
    inter = model.forward_intermediates(images=images, tokens=tokens, attn_layers=layers)
    plain = model.forward_intermediates(images=images, tokens=tokens)
    for key in ("image_hidden", "text_hidden"):
        for a, b in zip(inter[key], plain[key]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    attn = inter["text_attn"][3]
    assert attn.shape == (3, 2, 32, 32)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, 32))
    assert attn.triu(1).abs().max() == 0  # causal
    assert set(inter["image_attn"]) == set(layers) and inter["image_layers"] == [1, 2, 3, 4, 5]
    assert len(inter["text_pooled"]) == 6 and inter["text_pooled"][0].shape == (3, 64)


def test_pretrained_yaml_default(tmp_path, monkeypatch):
    """A yaml whose MODEL.PRETRAINED_MODEL exists loads it when `pretrained` is not given."""
    from msclip.checkpoint import save_official
    from reference_utils import REF_DIR

    model = msclip.create_model(str(REF_DIR / "config.yaml"))
    save_official(model, tmp_path / "w.pth")
    text = (REF_DIR / "config.yaml").read_text().replace("  NAME: clip_openai_pe_res_v1",
                                                          "  NAME: clip_openai_pe_res_v1\n  PRETRAINED_MODEL: w.pth")
    (tmp_path / "c.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    loaded = msclip.create_model("c.yaml")
    assert torch.equal(loaded.image.proj, model.image.proj)


def structured_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Different 'real-looking' normalised images: per-image colour cast and contrast, smooth
    sinusoidal patterns and a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    out = []
    for _ in range(n):
        freq = torch.randint(1, 6, (3, 2), generator=g).float()
        phase = torch.rand(3, 2, generator=g) * 6.28
        pattern = torch.stack([torch.sin(freq[c, 0] * torch.pi * xs + phase[c, 0])
                               * torch.cos(freq[c, 1] * torch.pi * ys + phase[c, 1]) for c in range(3)])
        contrast = 0.5 + torch.rand(1, generator=g)
        cast = 0.7 * torch.randn(3, 1, 1, generator=g)
        out.append(contrast * pattern + cast + 0.2 * torch.randn(3, size, size, generator=g))
    return torch.stack(out)


@pytest.mark.parametrize("name", TINY)
def test_random_init_image_embeddings_not_collapsed(name, one_thread):
    """Measured mean pairwise cosine over these 16 images, 1 - cos (seeds 0 and 1): CLIP-layout tiny
    configs 1.6e-2 .. 6.4e-2; msclip-s-*-tiny 2.1e-3 .. 4.1e-3 with BatchNorm statistics fitted at init
    (MSCLIP._fit_batchnorm_stats), but 6e-8 .. 1e-6 (float32 noise: every image the same) with the initial
    statistics (mean 0, var 1) under the official std-0.02 conv weights. The threshold 5e-4 sits 4x below
    the smallest healthy value and 100x above the collapsed ones."""
    model = msclip.create_model(name).eval()
    images = structured_images(16, model.cfg.vision.image_size)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    n = len(emb)
    mean_cos = ((emb @ emb.T).sum() - n) / (n * (n - 1))
    assert 1 - mean_cos > 5e-4, f"{name}: random-init image embeddings collapsed (mean cosine {mean_cos:.7f})"
