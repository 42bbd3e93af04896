"""CUDA-only checks (skipped without a GPU): bf16 autocast parity, a bf16 training step, fused attention,
compile, NCCL with one process. Token batches are made without the tokenizer (its vocabulary comes from
open_clip, which the GPU machines may lack)."""
import socket

import pytest
import torch
import torch.nn.functional as F

import msclip

pytestmark = pytest.mark.gpu


def _tokens(cfg, batch):
    """SOT, a few ids, EOT (the largest id, found by the argmax pooling), zero padding."""
    g = torch.Generator().manual_seed(0)
    out = torch.zeros(batch, cfg.text.context_length, dtype=torch.long)
    for row in range(batch):
        n = 3 + 5 * row % 17
        out[row, 0] = cfg.text.vocab_size - 2
        out[row, 1:n + 1] = torch.randint(1, cfg.text.vocab_size - 2, (n,), generator=g)
        out[row, n + 1] = cfg.text.vocab_size - 1
    return out


def _batch(name, device, batch=4):
    cfg = msclip.get_model_config(name)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size,
                         generator=torch.Generator().manual_seed(1)).to(device)
    return images, _tokens(cfg, batch).to(device)


@pytest.fixture()
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", ["msclip-s-b32", "clip-b32"])
def test_cuda_matches_cpu_fp32_and_bf16(name, no_tf32):
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
        cos = F.cosine_similarity(amp[key].float().cpu(), ref[key], dim=-1)
        assert (cos > 0.99).all(), (key, cos)


def test_training_step_bf16_with_checkpointing():
    model = msclip.create_model("msclip-s-b32", device="cuda").train()
    model.set_grad_checkpointing(True)
    images, tokens = _batch("msclip-s-b32", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, tokens)
        loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_autocast_training_step_follows_fp32():
    """One AdamW step under bf16 autocast lowers the loss of the batch and moves the weights as the fp32
    step does (fp32 master weights, bf16 matmuls)."""
    from msclip.loss import ClipLoss

    images, tokens = _batch("clip-b32-tiny", "cuda", batch=16)
    deltas, losses = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = msclip.create_model("clip-b32-tiny", device="cuda").train()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        seen = []
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(images, tokens)
                loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen.append(loss.item())
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 weights
        deltas[precision] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        losses[precision] = seen
    assert losses["bf16"][1] < losses["bf16"][0]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], abs=2e-2)
    assert F.cosine_similarity(deltas["bf16"], deltas["fp32"], dim=0) > 0.9


def test_attention_runs_a_fused_sdpa_kernel_on_cuda():
    """With only the flash / memory-efficient kernels allowed, the model still runs (SDPA took a fused
    kernel, not the math fallback) and agrees with the explicit-softmax path on the same weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from msclip.layers import multi_head_attention

    torch.manual_seed(0)
    lin_in, lin_out = torch.nn.Linear(64, 192).cuda(), torch.nn.Linear(64, 64).cuda()
    x = torch.randn(4, 50, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = multi_head_attention(x, lin_in, lin_out, heads=2, causal=True, need_weights=True)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            fused, _ = multi_head_attention(x, lin_in, lin_out, heads=2, causal=True)
            model = msclip.create_model("msclip-s-b32-tiny", device="cuda").eval()
            images, tokens = _batch("msclip-s-b32-tiny", "cuda")
            out = model(images, tokens)
    torch.testing.assert_close(fused.float(), ref.float(), atol=3e-2, rtol=0)
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()


def test_compile_matches_eager():
    model = msclip.create_model("msclip-s-b32-tiny", device="cuda")
    images, _ = _batch("msclip-s-b32-tiny", "cuda")
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode_image(images), model.encode_image(images), atol=1e-3, rtol=1e-3)


def test_nccl_with_one_process(monkeypatch):
    """init_distributed's NCCL path on one GPU: a one-process group (RANK/WORLD_SIZE set as torchrun would,
    but the group is started here since one process needs none), DDP on the local rank's GPU, collectives."""
    import torch.distributed as dist

    from msclip.train import distributed as D

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    dev = torch.device("cuda", 0)
    dist.init_process_group("nccl", device_id=dev)
    try:
        env = D.init_distributed("cuda")
        assert (env.rank, env.world_size, env.device, dist.get_backend()) == (0, 1, dev, "nccl")
        model = msclip.create_model("clip-b32-tiny", device="cuda").train()
        ddp = D.wrap_ddp(model, env.device)
        images, tokens = _batch("clip-b32-tiny", "cuda")
        out = ddp(images, tokens)
        (out["image_features"] * out["text_features"]).sum().backward()
        t = torch.ones(3, device=dev)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert D.broadcast_object({"a": 1}, D.DistEnv(world_size=2, device=dev)) == {"a": 1}
    finally:
        dist.destroy_process_group()
