"""Contracts every registered model keeps, checked on each `-tiny` config (as timm's test_models does):
forward/backward, a gradient for every parameter from the pair loss, intermediates that end at the
encoder output, gradient checkpointing that is engaged and exact, save/load round trips, parameter groups."""
import pytest
import torch

import msclip
import msclip.trunk
from msclip.checkpoint import save_official
from msclip.loss import ClipLoss
from msclip.train.precision import cpu_supports_bf16

TINY = [m for m in msclip.list_models() if m.endswith("-tiny")]
CAPTIONS = ["a photo of a dog", "two cats on a red mat", "x"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def batch(model, n=3):
    size = model.cfg.vision.image_size
    return torch.randn(n, 3, size, size), msclip.get_tokenizer(model.cfg.name)(CAPTIONS[:n])


def pair_loss(model, images, tokens):
    out = model(images, tokens)
    return ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_finite_gradient(name):
    model = msclip.create_model(name).train()
    loss = pair_loss(model, *batch(model))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: no or non-finite gradient for {bad}"


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU has no native bf16")
@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_backward(name):
    model = msclip.create_model(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pair_loss(model, *batch(model))
    loss.float().backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_intermediates_end_at_encoder_output(name):
    model = msclip.create_model(name).eval()
    images, tokens = batch(model)
    inter = model.forward_intermediates(images=images, tokens=tokens)
    with torch.no_grad():
        image = model.encode_image(images, project=False)
        text = model.encode_text(tokens, trim=False)
    assert inter["image_layers"][-1] == inter["text_layers"][-1] == model.cfg.num_layers - 1
    torch.testing.assert_close(model.image.pool(inter["image_hidden"][-1]), image, rtol=0, atol=1e-6)
    pooled_text = model.text.ln_final(inter["text_pooled"][-1]) @ model.text.proj
    torch.testing.assert_close(pooled_text, text, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_grad_checkpointing_engaged_and_exact(name, monkeypatch):
    model = msclip.create_model(name).train()
    images, tokens = batch(model, 2)
    calls = []
    real = msclip.trunk.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(msclip.trunk, "checkpoint", spy)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        calls.clear()
        pair_loss(model, images, tokens).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        # every block of each tower is checkpointed, and nothing is when disabled
        expected = len(model.cfg.modality_layers("image")) + len(model.cfg.modality_layers("text"))
        assert len(calls) == (expected if enable else 0), (enable, len(calls))
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), f"{name}: checkpointed gradient of {n} differs"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("fmt", [".pt", ".safetensors", "official"])
def test_save_load_round_trip(name, fmt, tmp_path):
    model = msclip.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # distinct from any fresh init
    path = tmp_path / ("w.pth" if fmt == "official" else f"w{fmt}")
    if fmt == "official":
        save_official(model, path)
    else:
        msclip.save_pretrained(model, path)
    torch.manual_seed(1)
    other = msclip.load_pretrained(msclip.create_model(name), path)
    mine, theirs = model.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("name", TINY)
def test_parameter_groups(name):
    model = msclip.create_model(name)
    groups = model.param_modality()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(groups) == sorted(names)
    assert set(groups.values()) <= {"shared", "image", "text", "other"}
    for n, g in groups.items():
        assert (g == "shared") == (".shared." in n), n
    assert [n for n, g in groups.items() if g == "other"] == ["logit_scale"]
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    if model.cfg.share:
        assert counts["shared"] > 0
