"""Trainer: recipes and overrides, parameter groups, schedule, checkpoints, exact resume, non-finite steps,
loss going down, and a 2-process gloo run of ``msclip train`` under torchrun. Tiny models, CPU only."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import msclip
from msclip.train import distributed as D
from msclip.train.loop import NonFiniteLossError
from msclip.train.main import train
from msclip.train.optim import group_param_names, param_groups
from msclip.train.recipe import OptimRecipe, RecipeError, load_recipe
from msclip.train.scheduler import lr_at
from msclip.train.state import list_checkpoints, load_train_state, resolve_resume, save_train_state
from train_utils import TINY, tiny_recipe

# --- recipes ------------------------------------------------------------------------------------------

def test_unknown_recipe_field_names_field_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: clip-b32-tiny\noptim:\n  lrr: 0.1\ntrain:\n  steps: 3\n")
    with pytest.raises(RecipeError, match=r"unknown recipe field 'optim.lrr' in .*bad.yaml.*did you mean 'lr'"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unknown recipe field 'train.stepz'"):
        load_recipe(None, ["train.stepz=3"])


def test_cli_overrides_are_type_checked(tmp_path: Path) -> None:
    from msclip.commands import train as cmd

    path = tmp_path / "r.yaml"
    path.write_text("model: clip-b32-tiny\noptim:\n  lr: 0.1\ntrain:\n  steps: 3\n")
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--optim.lr", "1e-3", "--train.precision=bf16",
                              "optim.betas=[0.9,0.95]", "train.grad_clip_norm=null", "log.tensorboard=false"])
    r = load_recipe(args.config, cmd.collect_overrides(args))
    assert r.optim.lr == 1e-3 and r.train.steps == 3 and r.train.precision == "bf16"
    assert r.optim.betas == [0.9, 0.95] and r.train.grad_clip_norm is None and r.log.tensorboard is False
    r = load_recipe(path, ["--train.steps", "7", "--model", "msclip-s-b32-tiny"])
    assert r.train.steps == 7 and r.model == "msclip-s-b32-tiny"
    with pytest.raises(RecipeError, match="train.steps: expected an integer"):
        load_recipe(path, ["train.steps=abc"])
    with pytest.raises(RecipeError, match="expected true/false"):
        load_recipe(path, ["log.progress=maybe"])
    with pytest.raises(RecipeError, match="exactly one of train.steps and train.epochs"):
        load_recipe(path, ["train.epochs=2"])


# --- optimiser groups and schedule ------------------------------------------------------------------

def test_param_groups_put_shared_tensors_in_shared_group() -> None:
    model = msclip.create_model("msclip-s-b32-tiny")
    cfg = OptimRecipe(lr=1e-3, weight_decay=0.05, lr_shared=2e-3, weight_decay_shared=0.2, scale_lr=True,
                      base_batch_size=256)
    groups = param_groups(model, cfg, global_batch=512)
    names = group_param_names(model, groups)
    shared = {n for n, _ in model.named_parameters() if ".shared." in n}
    assert shared and set(names["shared_decay"]) | set(names["shared_no_decay"]) == shared
    everything = [n for g in names.values() for n in g]
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    no_decay = set(names["no_decay"]) | set(names["shared_no_decay"])
    for n, p in model.named_parameters():
        if n.endswith(".bias") or n == "logit_scale" or "embedding" in n or p.ndim < 2:
            assert n in no_decay, n
    by = {g["name"]: g for g in groups}
    assert by["decay"]["lr"] == pytest.approx(2e-3) and by["shared_decay"]["lr"] == pytest.approx(4e-3)
    assert by["decay"]["weight_decay"] == 0.05 and by["shared_decay"]["weight_decay"] == 0.2
    assert by["no_decay"]["weight_decay"] == 0.0 and by["shared_no_decay"]["weight_decay"] == 0.0


def test_schedule_warmup_cosine_cooldown() -> None:
    kw = dict(total=100, warmup=10, cooldown=20, warmup_lr=1e-6, min_lr=1e-5)
    assert lr_at(0, 1e-3, **kw) == pytest.approx(1e-6)
    assert lr_at(5, 1e-3, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(10, 1e-3, **kw) == pytest.approx(1e-3)
    assert lr_at(45, 1e-3, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint
    assert lr_at(80, 1e-3, **kw) == lr_at(99, 1e-3, **kw) == 1e-5


# --- checkpoints --------------------------------------------------------------------------------------

def test_checkpoint_pruning_keeps_last_k(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    for step in (1, 2, 3, 10, 11):
        save_train_state(folder / f"step_{step:08d}.pt", {"step": step, "optimizer": {}}, keep_last=2)
    (folder / ".step_00000012.pt.abc.tmp").write_bytes(b"partial write")  # an interrupted save
    assert [s for s, _ in list_checkpoints(folder)] == [10, 11]
    assert resolve_resume("latest", tmp_path / "run").name == "step_00000011.pt"
    assert load_train_state(resolve_resume(str(folder), tmp_path))["step"] == 11
    assert resolve_resume("latest", tmp_path / "empty") is None


# --- training -----------------------------------------------------------------------------------------

def test_few_steps_lower_the_loss(tmp_path: Path) -> None:
    r = tiny_recipe(tmp_path, "learn", train__steps=20, optim={"lr": 5e-4, "weight_decay": 0.0, "warmup": 0},
                    data={"kind": "synthetic", "num_samples": 32, "batch_size": 16, "workers": 0})
    res = train(r)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    # below ln(batch) means better than matching at random, not just recovering from an early spike
    assert last < first - 0.2 and last < math.log(16) - 0.15, res.losses
    assert res.state.step == 20 and Path(res.exported).is_file()
    loaded = msclip.create_model(TINY, pretrained=res.exported)  # exported weights load in the factory
    final = torch.load(res.last_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, final[k]) for k, v in loaded.state_dict().items())
    assert (res.run_dir / "recipe.yaml").is_file() and (res.run_dir / "metrics-train.csv").is_file()


def test_resume_after_interruption_reproduces_weights_exactly(tmp_path: Path) -> None:
    # msclip-s: shared params, BatchNorm stats, conv stem; accum_freq=2 (feature cache); 4 batches/epoch =
    # 2 steps/epoch. The checkpoint at step 3 is mid-epoch after a full epoch of random crops (so the RNG
    # must be restored, not replayed from the seed); the resumed run then crosses an epoch boundary.
    common = dict(model="msclip-s-b32-tiny", train__steps=5, train__accum_freq=2, train__grad_clip_norm=1.0,
                  data={"kind": "synthetic", "num_samples": 16, "batch_size": 4, "workers": 0},
                  checkpoint={"every": 3, "keep_last": 2})
    full = train(tiny_recipe(tmp_path, "full", **common))
    part = train(tiny_recipe(tmp_path, "cut", **common), stop_after=4)  # "killed" after step 4
    assert part.state.step == 4 and part.last_checkpoint.endswith("step_00000003.pt")
    resumed = train(tiny_recipe(tmp_path, "cut", resume="latest", **common))
    assert resumed.state.step == 5
    assert resumed.losses == full.losses[3:]  # steps 4..5 replayed identically
    a = torch.load(full.last_checkpoint, weights_only=True)
    b = torch.load(resumed.last_checkpoint, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_nonfinite_loss_is_skipped_counted_then_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from msclip.loss import ClipLoss

    real = ClipLoss.forward
    calls = {"n": 0, "bad": {2, 3}}

    def flaky(self, img, txt, scale):  # noqa: ANN001 - test double
        calls["n"] += 1
        loss = real(self, img, txt, scale)
        return loss * float("nan") if calls["n"] in calls["bad"] else loss

    monkeypatch.setattr(ClipLoss, "forward", flaky)
    res = train(tiny_recipe(tmp_path, "flaky", train__steps=5, train__max_nonfinite=3))
    assert res.state.step == 5 and res.state.nonfinite_total == 2 and len(res.losses) == 3
    kinds = [json.loads(line)["kind"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("nonfinite") == 2

    calls["n"], calls["bad"] = 0, set(range(3, 100))  # from step 3 on every loss is NaN
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row.*step_00000002.pt"):
        train(tiny_recipe(tmp_path, "diverge", train__steps=8, train__max_nonfinite=3,
                          checkpoint={"every": 2, "keep_last": 2}))
    last = resolve_resume("latest", tmp_path / "diverge")
    assert last.name == "step_00000002.pt" and load_train_state(last)["step"] == 2


def test_ddp_wrap_on_cpu_has_no_device_ids(tmp_path: Path, one_thread: None) -> None:
    """A real DDP wrapper in a 1-process gloo group: no device_ids on CPU, and accumulated training
    through it (no_sync on all but the last micro-batch) gives the unwrapped model's gradients."""
    import torch.distributed as dist

    from msclip.loss import ClipLoss
    from msclip.train.loop import backward_accumulated
    from msclip.train.precision import get_precision

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = msclip.create_model(TINY)
        twin = msclip.create_model(TINY)
        twin.load_state_dict(model.state_dict())
        ddp = D.wrap_ddp(model, torch.device("cpu"))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.device_ids is None
        g = torch.Generator().manual_seed(0)
        size = model.cfg.vision.image_size
        micro = [(torch.randn(2, 3, size, size, generator=g), torch.randint(1, 100, (2, 8), generator=g))
                 for _ in range(2)]
        fp32 = get_precision("fp32", torch.device("cpu"))
        for _ in range(2):  # a second step: DDP's reducer must have finished the first one
            loss = backward_accumulated(ddp, micro, ClipLoss(), fp32, None)
            ref = backward_accumulated(twin, micro, ClipLoss(), fp32, None)
            assert torch.isfinite(loss) and torch.equal(loss, ref)
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-7), name
            model.zero_grad(set_to_none=True)
            twin.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision,extra", [("fp16", {"grad_clip_norm": 1.0}), ("bf16", {"grad_checkpointing": True})])
def test_low_precision_and_grad_checkpointing_run(tmp_path: Path, precision: str, extra: dict) -> None:
    # fp16 goes through the gradient scaler (+ unscale before clipping); bf16 through autocast alone
    r = tiny_recipe(tmp_path, precision, train={"steps": 2, "precision": precision, "threads": 1, **extra},
                    data={"kind": "synthetic", "num_samples": 8, "batch_size": 4, "workers": 0})
    res = train(r)
    assert res.precision == precision and res.state.step == 2 and res.state.nonfinite_total == 0
    state = load_train_state(res.last_checkpoint)
    assert bool(state["scaler"]) == (precision == "fp16")
