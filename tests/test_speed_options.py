"""Speed options: train.compile (same losses as eager, one graph for every text length, checkpoints with
the model's own keys, resume), train.channels_last (same numbers), fused AdamW on CUDA and on the CPU, CUDA backend
flags. CPU: compile uses the `aot_eager` / `eager` backends (inductor's C++ build takes minutes here)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import msclip
from msclip.loss import ClipLoss
from msclip.model import MSCLIP
from msclip.train.main import train
from msclip.train.optim import adamw_kernel, build_optimizer
from msclip.train.precision import CompiledForward, configure_backends, set_channels_last
from msclip.train.recipe import OptimRecipe
from train_utils import tiny_recipe

CONFIGS = Path(msclip.__file__).parent / "model_configs"


def small_config(tmp_path: Path, base: str = "clip-b32-tiny", layers: int = 1) -> str:
    """The tiny config with one layer per tower: compiling on CPU costs time per traced layer."""
    cfg = json.loads((CONFIGS / f"{base}.json").read_text())
    cfg["vision"]["layers"] = cfg["text"]["layers"] = layers
    path = tmp_path / f"{base}-l{layers}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def tokens_of_length(n: int, longest: int, g: torch.Generator | None = None, context: int = 32) -> torch.Tensor:
    """A batch whose longest caption has ``longest`` tokens (EOT, the argmax, at longest - 1)."""
    t = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        k = longest if i == 0 else max(2, longest - 1 - i)
        t[i, : k - 1] = torch.randint(1, 1000, (k - 1,), generator=g)
        t[i, k - 1] = 49407
    return MSCLIP.trim_tokens(t)


def run_steps(model: torch.nn.Module, params: MSCLIP, lengths: list[int]) -> list[float]:
    opt = build_optimizer(params, OptimRecipe(lr=1e-3), 8)
    g = torch.Generator().manual_seed(0)
    losses = []
    for longest in lengths:
        images, tokens = torch.randn(4, 3, 64, 64, generator=g), tokens_of_length(4, longest, g)
        out = model(images, tokens, trim=False)
        loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # ~30 s on a loaded 2-core machine (AOTAutograd traces forward and backward)
def test_compiled_forward_matches_eager_with_one_graph_for_all_lengths(tmp_path: Path, one_thread: None) -> None:
    """3 optimiser steps with texts trimmed to 8, 16 and 32 tokens: the same losses and weights as eager,
    and exactly one graph compiled (the text length is dynamic); a no-grad pass adds exactly one more."""
    eager = msclip.create_model(small_config(tmp_path))
    eager.train()
    compiled_model = copy.deepcopy(eager)
    compiled = CompiledForward(compiled_model, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    ref = run_steps(eager, eager, [5, 12, 30])  # trimmed to 8, 16 and 32 (the whole context) tokens
    got = run_steps(compiled, compiled_model, [5, 12, 30])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch.no_grad():  # the feature-cache pass of train.accum_freq > 1: grad mode is part of the guard
        compiled(torch.randn(4, 3, 64, 64), tokens_of_length(4, 20), trim=False)
        compiled(torch.randn(4, 3, 64, 64), tokens_of_length(4, 7), trim=False)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert list(compiled.module.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix


def test_train_with_compile_saves_model_keys_and_resumes(tmp_path: Path) -> None:
    """train.compile=model through the trainer: losses equal the eager run's, the checkpoint holds the
    model's own keys, and a run resumed with compile on continues exactly."""
    common = dict(model=small_config(tmp_path), train__steps=3, checkpoint={"every": 2, "keep_last": 2})
    eager = train(tiny_recipe(tmp_path, "eager", **common))
    on = dict(common, train__compile="model", train__compile_backend="eager")
    torch._dynamo.reset()
    counters.clear()
    part = train(tiny_recipe(tmp_path, "cut", **on), stop_after=2)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the compiled forward ran
    saved = torch.load(part.last_checkpoint, weights_only=True)
    assert list(saved["model"]) == list(msclip.create_model(common["model"]).state_dict())
    resumed = train(tiny_recipe(tmp_path, "cut", resume="latest", **on))
    torch.testing.assert_close(part.losses + resumed.losses, eager.losses, rtol=0, atol=1e-6)
    final = torch.load(resumed.last_checkpoint, weights_only=True)["model"]
    ref = torch.load(eager.last_checkpoint, weights_only=True)["model"]
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_channels_last_gives_the_same_numbers(tmp_path: Path, one_thread: None) -> None:
    """MS-CLIP-S's conv stem and parallel branch in NHWC: weights and image input converted, the features
    and gradients unchanged, the state_dict keys and the exported weights the same."""
    torch.manual_seed(0)
    plain = msclip.create_model("msclip-s-b32-tiny")
    nhwc = copy.deepcopy(plain)
    assert set_channels_last(nhwc) == ["image.stem", "image.parallel"]
    conv = nhwc.image.parallel.stages[0].conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen = []
    nhwc.image.stem.register_forward_hook(lambda m, a, o: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last)))
    images = torch.randn(4, 3, 64, 64)
    for m in (plain, nhwc):
        m.train()
        m.encode_image(images).square().sum().backward()
    assert seen == [True]
    torch.testing.assert_close(nhwc.encode_image(images), plain.encode_image(images), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    msclip.save_pretrained(nhwc, tmp_path / "w.safetensors")  # (safetensors needs contiguous tensors)
    assert list(nhwc.state_dict()) == list(plain.state_dict())


def test_adamw_is_fused_when_every_parameter_is_on_one_device_kind() -> None:
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert adamw_kernel(cpu) == {"fused": True}
    assert adamw_kernel([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]) == {"fused": True}
    assert adamw_kernel([]) == {"foreach": None}
    opt = build_optimizer(msclip.create_model("clip-b32-tiny"), OptimRecipe(), 8)
    assert opt.defaults["fused"]
    # fused and the per-tensor loop give the same update (so the switch changes speed, not the recipe)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    oa, ob = torch.optim.AdamW([a], lr=0.1, fused=True), torch.optim.AdamW([b], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(), ob.step()
    torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)


def test_backend_flags_are_cuda_only() -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    assert configure_backends(torch.device("cpu"), tf32=True) == {}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


@pytest.mark.gpu
def test_cuda_fused_adamw_and_backend_flags() -> None:
    dev = torch.device("cuda")
    opt = build_optimizer(msclip.create_model("clip-b32-tiny", device=dev), OptimRecipe(), 8)
    assert opt.defaults["fused"] is True
    flags = configure_backends(dev, tf32=True, deterministic=False)
    assert flags == {"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    configure_backends(dev, tf32=False, deterministic=True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
