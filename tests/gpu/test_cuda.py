"""CUDA-only checks (skipped without a GPU): bf16 autocast parity, fused attention, compile."""
import pytest
import torch

import msclip

pytestmark = pytest.mark.gpu


def _batch(name, device):
    cfg = msclip.get_model_config(name)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = msclip.get_tokenizer(name)(["a dog", "a cat on a mat", "x", "a red car"]).to(device)
    return images, tokens


@pytest.mark.parametrize("name", ["msclip-s-b32", "clip-b32"])
def test_cuda_matches_cpu_fp32_and_bf16(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = msclip.create_model(name)
    images, tokens = _batch(name, "cpu")
    with torch.no_grad():
        ref = model(images, tokens)
        gpu = model.cuda()
        out = gpu(images.cuda(), tokens.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = gpu(images.cuda(), tokens.cuda())
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].cpu(), ref[key], atol=1e-4, rtol=0)
        cos = torch.nn.functional.cosine_similarity(amp[key].float().cpu(), ref[key], dim=-1)
        assert (cos > 0.99).all()


def test_training_step_bf16_with_checkpointing():
    model = msclip.create_model("msclip-s-b32", device="cuda").train()
    model.set_grad_checkpointing(True)
    images, tokens = _batch("msclip-s-b32", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, tokens)
        loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_compile_matches_eager():
    model = msclip.create_model("msclip-s-b32-tiny", device="cuda")
    images, tokens = _batch("msclip-s-b32-tiny", "cuda")
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_image(images), model.encode_image(images), atol=1e-3, rtol=1e-3)
