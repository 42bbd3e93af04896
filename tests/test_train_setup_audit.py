"""Audit of the training set-up: precision choice, optimiser parameter groups, the lr schedule at its
boundaries, gradient clipping and fp16 unscaling as the optimiser sees them, cross-field recipe checks,
the saved recipe and seed determinism. Tiny models, a few steps (see tests/train_utils.py)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import msclip
from msclip.errors import MsclipError
from msclip.layers import LayerNorm as MsclipLayerNorm
from msclip.loss import make_loss
from msclip.model import MSCLIP
from msclip.train import precision as P
from msclip.train.logger import read_metrics
from msclip.train.main import train
from msclip.train.optim import GROUP_NAMES, build_optimizer, group_param_names, param_groups
from msclip.train.recipe import OptimRecipe, RecipeError, load_recipe, recipe_from_dict
from msclip.train.scheduler import WarmupCosine, lr_at
from msclip.train.state import load_train_state
from train_utils import tiny_recipe

# --- precision --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("avx512_bf16,amx,avx512,want", [
    (False, False, False, False), (True, False, True, True), (False, True, True, True),
    (False, False, True, False),  # plain AVX-512: oneDNN converts, slower than fp32 -> not native
])
def test_cpu_bf16_detection_counts_only_native_bf16(monkeypatch, avx512_bf16, amx, avx512, want) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512, raising=False)
    assert P.cpu_supports_bf16() is want


def test_cpu_bf16_detection_without_the_probes_is_false(monkeypatch) -> None:
    """An older torch without the probes: no bf16 claimed (so auto stays fp32)."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert P.cpu_supports_bf16() is False
    assert P.resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_is_bf16_only_with_native_bf16(monkeypatch, native) -> None:
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: native)
    want = "bf16" if native else "fp32"
    assert P.resolve_precision("auto", torch.device("cpu")) == want
    prec = P.get_precision("auto", torch.device("cpu"))
    assert prec.name == want and prec.dtype == (torch.bfloat16 if native else None)
    assert prec.make_scaler() is None  # neither bf16 nor fp32 scales the loss


@pytest.mark.parametrize("bf16_ok,want", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch, bf16_ok, want) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: True)  # the CPU's answer must not matter
    assert P.resolve_precision("auto", torch.device("cuda")) == want


def test_explicit_precisions_are_kept_and_bad_ones_refused(monkeypatch, caplog) -> None:
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: False)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert [P.resolve_precision(n, cpu) for n in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert "no native bf16" in caplog.text and "fp16 on CPU" in caplog.text  # slow, but what was asked for
    with pytest.raises(ValueError, match=r"train.precision='fp64': use auto, fp32, bf16 or fp16"):
        P.resolve_precision("fp64", cpu)
    with pytest.raises(RecipeError, match=r"train.precision='BF16': is not one of auto, fp32, bf16, fp16"):
        load_recipe(None, ["train.steps=1", "train.precision=BF16"])
    assert P.get_precision("fp16", cpu).make_scaler() is not None
    assert P.get_precision("bf16", cpu).make_scaler() is None


# --- optimiser parameter groups -----------------------------------------------------------------------------

_NO_DECAY_OWNERS = (nn.LayerNorm, MsclipLayerNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.Embedding)
_NO_DECAY_ATTRS = {"class_embedding", "positional_embedding", "logit_scale"}


def _expected_group(model: nn.Module, name: str) -> str:
    """Independent of optim.py: decided by the owning module's type and the attribute name."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if attr == "bias" or isinstance(module, _NO_DECAY_OWNERS) or attr in _NO_DECAY_ATTRS:
        decay = False
    elif (attr == "weight" and isinstance(module, (nn.Linear, nn.Conv2d))) or attr == "proj":
        decay = True
    else:
        raise AssertionError(f"{name}: a parameter of a kind this audit does not know ({type(module).__name__})")
    shared = ".shared." in f".{name}."
    return ("shared_" if shared else "") + ("decay" if decay else "no_decay")


@pytest.fixture(scope="module")
def registry_models() -> dict[str, MSCLIP]:
    """Every named config (full size and tiny) on the meta device, weights left uninitialised (fast)."""
    real_init = MSCLIP.init_weights
    MSCLIP.init_weights = lambda self, *a, **k: None
    try:
        with torch.device("meta"):
            return {n: MSCLIP(msclip.get_model_config(n), fit_batchnorm_stats=False) for n in msclip.list_models()}
    finally:
        MSCLIP.init_weights = real_init


def test_every_registry_model_puts_each_parameter_in_its_documented_group(registry_models) -> None:
    cfg = OptimRecipe(lr=1e-3, weight_decay=0.1, lr_shared=2e-4, weight_decay_shared=0.3)
    assert len(registry_models) >= 26
    for model_name, model in registry_models.items():
        groups = param_groups(model, cfg)
        names = group_param_names(model, groups)
        listed = [n for g in names.values() for n in g]
        all_names = [n for n, _ in model.named_parameters()]
        assert len(listed) == len(set(listed)), f"{model_name}: a parameter in two groups"
        assert sorted(listed) == sorted(all_names), f"{model_name}: parameters missing from the groups"
        where = {n: g for g, ns in names.items() for n in ns}
        wrong = {n: (where[n], _expected_group(model, n)) for n in all_names if where[n] != _expected_group(model, n)}
        assert not wrong, (model_name, wrong)
        by = {g["name"]: g for g in groups}
        assert set(by) <= set(GROUP_NAMES)
        want = {"decay": (1e-3, 0.1), "no_decay": (1e-3, 0.0), "shared_decay": (2e-4, 0.3),
                "shared_no_decay": (2e-4, 0.0)}
        for key, g in by.items():
            assert (g["lr"], g["base_lr"], g["weight_decay"]) == (*want[key][:1], want[key][0], want[key][1]), \
                (model_name, key)
        has_shared = any(".shared." in n for n in all_names)
        assert ("shared_decay" in by) == has_shared, model_name  # sharing models do get a shared group


def test_loss_parameters_join_no_decay_and_frozen_parameters_stay_out() -> None:
    model = msclip.create_model("clip-b32-tiny")
    model.text.token_embedding.weight.requires_grad_(False)
    loss = make_loss("siglip", rank=0, world_size=1, local_loss=True, gather_with_grad=True, siglip_bias_init=-10.0)
    extra = list(loss.parameters())
    assert extra
    opt = build_optimizer(model, OptimRecipe(lr=1e-3, weight_decay=0.2), 8, extra)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    no_decay = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert all(any(p is q for q in no_decay["params"]) for p in extra) and no_decay["weight_decay"] == 0.0
    assert id(model.text.token_embedding.weight) not in ids  # frozen: not optimised
    trainable = {id(p) for p in model.parameters() if p.requires_grad} | {id(p) for p in extra}
    assert set(ids) == trainable


# --- the lr schedule at its boundaries ---------------------------------------------------------------------

def test_schedule_values_at_step_zero_end_of_warmup_and_last_step() -> None:
    base, kw = 1e-3, dict(total=10, warmup=4, cooldown=0, warmup_lr=1e-5, min_lr=1e-6)
    assert lr_at(0, base, **kw) == 1e-5  # the first update uses warmup_lr
    assert lr_at(3, base, **kw) == pytest.approx(1e-5 + (base - 1e-5) * 3 / 4)
    assert lr_at(4, base, **kw) == pytest.approx(base)  # the end of the warm-up is the peak
    assert lr_at(9, base, **kw) == pytest.approx(1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * 5 / 6)))
    assert lr_at(10, base, **kw) == 1e-6
    values = [lr_at(s, base, **kw) for s in range(4, 11)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically after the peak
    no_warmup = dict(kw, warmup=0)
    assert lr_at(0, base, **no_warmup) == pytest.approx(base)  # no warm-up: step 0 is the peak
    const = dict(kw, cooldown=2)
    assert [lr_at(s, base, schedule="const", **const) for s in (4, 7, 8, 9)] == [base, base, 1e-6, 1e-6]
    assert lr_at(9, base, schedule="const", **kw) == lr_at(10, base, schedule="const", **kw) == base  # no decay


def test_scheduler_validates_and_resumes_to_the_same_lrs() -> None:
    p = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"warm-up \(3\) \+ cooldown \(2\) steps exceed the run \(4 steps\)"):
        WarmupCosine(torch.optim.SGD(p, lr=1.0), total=4, warmup=3, cooldown=2)
    WarmupCosine(torch.optim.SGD(p, lr=1.0), total=4, warmup=2, cooldown=2)  # exactly the run: allowed

    def make() -> tuple[torch.optim.Optimizer, WarmupCosine]:
        opt = torch.optim.SGD([{"params": [p[0]], "lr": 1e-3}, {"params": [p[1]], "lr": 5e-4}], lr=1e-3)
        return opt, WarmupCosine(opt, total=12, warmup=3, cooldown=2, warmup_lr=1e-6, min_lr=1e-5)

    opt, sched = make()
    for step in range(7):
        sched.step(step)
    saved = sched.state_dict()
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    assert sched2.step_num == 6
    for step in range(7, 12):
        sched.step(step), sched2.step(step)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
        assert opt.param_groups[1]["lr"] == pytest.approx(lr_at(step, 5e-4, total=12, warmup=3, cooldown=2,
                                                                 warmup_lr=1e-6, min_lr=1e-5))


# --- what the optimiser sees: clipping, fp16 unscaling -----------------------------------------------------

@pytest.fixture()
def seen_grad_norms():
    """The global gradient norm over every optimised parameter, at each optimiser step (a global pre-hook)."""
    norms: list[float] = []

    def hook(optimizer, args, kwargs):  # noqa: ANN001, ANN202
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    yield norms
    handle.remove()


def test_gradient_clipping_bounds_the_norm_the_optimiser_sees_siglip_bias_included(tmp_path, seen_grad_norms) -> None:
    clip = 1e-3
    res = train(tiny_recipe(tmp_path, "clip", train__steps=2, train__loss="siglip", train__grad_clip_norm=clip,
                            data__num_samples=16, checkpoint__export=False))
    logged = [r["grad_norm"] for r in read_metrics(res.run_dir, "train")]
    assert len(seen_grad_norms) == 2 and all(n > 10 * clip for n in logged), logged  # clipping had work to do
    assert all(0 < n <= clip * (1 + 1e-4) for n in seen_grad_norms), seen_grad_norms


def test_fp16_gradients_reach_the_optimiser_unscaled(tmp_path, seen_grad_norms) -> None:
    """The loss is scaled for backward and the gradients unscaled before the norm, clipping and step: the
    first step's gradient norm under fp16 matches fp32's (a missed (un)scaling is off by 2**16)."""
    common = dict(train__steps=1, data__num_samples=8, checkpoint__export=False)
    fp32 = train(tiny_recipe(tmp_path, "fp32", **common))
    fp16 = train(tiny_recipe(tmp_path, "fp16", train__precision="fp16", train__grad_clip_norm=1e6, **common))
    assert fp16.precision == "fp16" and fp16.state.nonfinite_total == 0
    n32, n16 = (read_metrics(r.run_dir, "train")[0]["grad_norm"] for r in (fp32, fp16))
    assert n16 == pytest.approx(n32, rel=0.05), (n16, n32)
    assert seen_grad_norms[1] == pytest.approx(n32, rel=0.05), seen_grad_norms
    assert load_train_state(fp16.last_checkpoint)["scaler"]["scale"] > 1  # a live scaler, saved


# --- recipe: values that contradict each other --------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["optim.warmup=5"], ["optim.cooldown=3"], ["optim.warmup=2", "optim.cooldown=1"]])
def test_warmup_and_cooldown_longer_than_the_run_are_recipe_errors(overrides) -> None:
    with pytest.raises(RecipeError, match=r"optim\.(warmup|cooldown)=.*train.steps"):
        load_recipe(None, ["train.steps=2", "model=clip-b32-tiny", *overrides])


def test_warmup_as_long_as_the_run_is_allowed() -> None:
    r = load_recipe(None, ["train.steps=2", "model=clip-b32-tiny", "optim.warmup=1", "optim.cooldown=1"])
    assert (r.optim.warmup, r.optim.cooldown) == (1.0, 1.0)


def test_warmup_in_epochs_longer_than_the_run_is_a_user_error(tmp_path) -> None:
    """Warm-up in epochs against a run in steps: only the data's size tells (16 samples / batch 8 = 2 steps
    per epoch, so 3 epochs are 6 steps of a 4-step run): a RecipeError naming both, not the scheduler's."""
    r = tiny_recipe(tmp_path, "ep", train={"steps": 4, "precision": "fp32", "threads": 1},
                    optim={"unit": "epochs", "warmup": 3}, data__num_samples=16)
    with pytest.raises(RecipeError, match=r"optim\.warmup=3.*6 steps, more than the run's 4"):
        train(r)


def test_warmup_in_epochs_longer_than_epochs_is_caught_by_the_recipe(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"optim\.warmup=3.*exceed train\.epochs=1"):
        tiny_recipe(tmp_path, "ep", train={"steps": None, "epochs": 1, "precision": "fp32", "threads": 1},
                    optim={"unit": "epochs", "warmup": 3})


# --- the saved recipe and seed determinism -----------------------------------------------------------------

def test_same_seed_same_weights_and_the_saved_recipe_is_what_ran(tmp_path) -> None:
    common = dict(model="msclip-s-b32-tiny", train__steps=2, data__num_samples=16, checkpoint__export=False)
    runs = {name: train(tiny_recipe(tmp_path, name, seed=seed, **common))
            for name, seed in (("a", 3), ("b", 3), ("c", 4))}
    w = {k: load_train_state(r.last_checkpoint)["model"] for k, r in runs.items()}
    assert all(torch.equal(w["a"][k], w["b"][k]) for k in w["a"])  # bit-identical
    assert any(not torch.equal(w["a"][k], w["c"][k]) for k in w["a"] if w["a"][k].is_floating_point())
    saved = load_recipe(runs["a"].run_dir / "recipe.yaml")
    assert saved == tiny_recipe(tmp_path, "a", seed=3, **common)
    assert recipe_from_dict(saved.to_dict()).seed == 3
