"""Speed options: train.compile model and step (same losses as eager, one graph for every text length,
step's graph holding the loss, checkpoints with the model's own keys, resume), train.channels_last (same
numbers), fused AdamW on CUDA and on the CPU, CUDA backend flags. CPU: compile uses the `aot_eager` /
`eager` backends (inductor's C++ build takes minutes here)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import msclip
from msclip.loss import ClipLoss, make_loss
from msclip.model import MSCLIP
from msclip.train.main import train
from msclip.train.loop import backward_accumulated
from msclip.train.optim import adamw_kernel, build_optimizer
from msclip.train.precision import (CompiledForward, CompiledStep, Precision, compile_for_training,
                                    configure_backends, set_channels_last)
from msclip.train.recipe import OptimRecipe, RecipeError, load_recipe
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
    """3 optimiser steps with texts trimmed to 5, 12 and 30 tokens: the same losses and weights as eager,
    and exactly one graph compiled (the text length is dynamic); a no-grad pass adds exactly one more."""
    eager = msclip.create_model(small_config(tmp_path))
    eager.train()
    compiled_model = copy.deepcopy(eager)
    compiled = CompiledForward(compiled_model, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    ref = run_steps(eager, eager, [5, 12, 30])  # trimmed to 5, 12 and 30 tokens (context 32)
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


def loop_steps(model: torch.nn.Module, params: MSCLIP, loss_fn: torch.nn.Module, lengths: list[int],
               accum: int = 1) -> list[float]:
    """Optimiser steps through the train loop's `backward_accumulated`, ``accum`` micro-batches each."""
    opt = build_optimizer(params, OptimRecipe(lr=1e-3), 8, list(loss_fn.parameters()))
    g = torch.Generator().manual_seed(0)
    losses = []
    for longest in lengths:
        micro = [(torch.randn(4, 3, 64, 64, generator=g), tokens_of_length(4, longest - 3 * j, g))
                 for j in range(accum)]
        fp32 = Precision("fp32", torch.device("cpu"))
        losses.append(backward_accumulated(model, micro, loss_fn, fp32, None).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_compiled_step_is_one_graph_with_the_loss_for_all_lengths(tmp_path: Path, one_thread: None,
                                                                  loss_name: str) -> None:
    """train.compile=step through the loop: 3 steps with texts trimmed to 5, 12 and 30 tokens give eager's
    losses and weights (the loss's own SigLIP bias too) from ONE graph that holds the loss; with
    accumulation only the forward is compiled (grad and no-grad: two more graphs, no loss in them)."""
    eager = msclip.create_model(small_config(tmp_path))
    eager.train()
    model = copy.deepcopy(eager)
    graphs = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    step = CompiledStep(model, backend=recording)
    ref_loss, loss = make_loss(loss_name), make_loss(loss_name)
    torch._dynamo.reset()
    counters.clear()
    ref = loop_steps(eager, eager, ref_loss, [5, 12, 30])
    got = loop_steps(step, model, loss, [5, 12, 30])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == len(graphs) == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_op = F.cross_entropy if loss_name == "clip" else F.logsigmoid
    assert loss_op in {n.target for n in graphs[0].graph.nodes}  # the loss is inside the step's graph
    ref += loop_steps(eager, eager, ref_loss, [20, 11], accum=2)
    got += loop_steps(step, model, loss, [20, 11], accum=2)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert len(graphs) == 3 and all(loss_op not in {n.target for n in g.graph.nodes} for g in graphs[1:])
    for (name, a), b in zip([*eager.named_parameters(), *ref_loss.named_parameters()],
                            [*model.parameters(), *loss.parameters()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert list(step.module.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix


def test_recipe_accepts_compile_step_and_lists_the_modes_on_a_bad_one() -> None:
    assert load_recipe(None, ["train.steps=1", "train.compile=step"]).train.compile == "step"
    with pytest.raises(RecipeError, match=r"train.compile='graph': is not one of off, model, step"):
        load_recipe(None, ["train.steps=1", "train.compile=graph"])


def test_compile_modes_and_the_ddp_fallback(tmp_path: Path) -> None:
    model = msclip.create_model(small_config(tmp_path))
    assert compile_for_training(model, "off", "eager", distributed=False) is model
    assert type(compile_for_training(model, "model", "eager", distributed=False)) is CompiledForward
    assert type(compile_for_training(model, "step", "eager", distributed=False)) is CompiledStep
    # DDP must wrap the module whose forward runs: under it step compiles the forward only
    assert type(compile_for_training(model, "step", "eager", distributed=True)) is CompiledForward


def varied_captions(root: Path, n: int = 24) -> dict:
    """A csv data section whose captions run from 1 to ``n`` words, so batches trim to different lengths."""
    (root / "img").mkdir()
    lines = ["filepath,title"]
    for i in range(n):
        Image.new("RGB", (32, 32), ((i * 37) % 256, 80, 160)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png," + " ".join(["red", "square"][i % 2] for _ in range(i + 1)))
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {"kind": "csv", "path": str(root / "pairs.csv"), "batch_size": 8, "workers": 0}


def test_train_with_compile_step_matches_eager_with_model_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile=step through the trainer, over batches trimmed to different text lengths: eager's
    losses and final weights, one graph, and the checkpoint and the exported weights with the model's keys."""
    common = dict(model=small_config(tmp_path), train__steps=3, data=varied_captions(tmp_path))
    eager = train(tiny_recipe(tmp_path, "eager", **common))
    lengths, steps = [], []
    trim, step = MSCLIP.trim_tokens, CompiledStep.forward_loss
    monkeypatch.setattr(MSCLIP, "trim_tokens", staticmethod(lambda t: lengths.append(trim(t).shape[1]) or trim(t)))
    monkeypatch.setattr(CompiledStep, "forward_loss", lambda self, *a: steps.append(1) or step(self, *a))
    torch._dynamo.reset()
    counters.clear()
    got = train(tiny_recipe(tmp_path, "step", train__compile="step", train__compile_backend="eager", **common))
    assert len(set(lengths)) > 1 and len(steps) == 3, (lengths, steps)  # every step ran forward_loss
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the compiled step ran
    torch.testing.assert_close(got.losses, eager.losses, rtol=0, atol=1e-6)
    final = torch.load(got.last_checkpoint, weights_only=True)["model"]
    ref = torch.load(eager.last_checkpoint, weights_only=True)["model"]
    assert list(final) == list(msclip.create_model(common["model"]).state_dict())
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], rtol=0, atol=1e-6, msg=k)
    assert set(load_file(got.exported)) == set(ref)  # (read raw: loading would accept other layouts)


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
