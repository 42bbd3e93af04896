"""Trainer promises, each checked end to end on tiny models: gradient accumulation equals one big batch,
the logit-scale clamp, epochs -> steps, the recipe lr on resume, resume with another number of processes,
and in-training zero-shot at the steps the recipe names (DDP keeping the ranks identical: test_multinode.py).
CPU, fp32, one thread."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import msclip
from msclip.loss import ClipLoss
from msclip.train.logger import read_metrics
from msclip.train.loop import backward_accumulated
from msclip.train.main import train
from msclip.train.precision import get_precision
from msclip.train.scheduler import lr_at
from msclip.train.state import load_train_state
from torchrun_utils import run_torchrun
from train_utils import TINY, tiny_recipe


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_accumulation_gives_the_gradients_of_one_big_batch(one_thread: None) -> None:
    """msclip caches every micro-batch's features (open_clip's scheme), so the loss of k micro-batches of B
    sees all k x B negatives: every parameter's gradient, the temperature's included, equals one k x B
    batch's. Promised for models without batch statistics (clip-b32-tiny: LayerNorm only, no dropout);
    MS-CLIP-S's BatchNorm stem sees micro-batches of B."""
    model = msclip.create_model(TINY)
    model.train()
    g = torch.Generator().manual_seed(0)
    size = model.cfg.vision.image_size
    images = torch.randn(8, 3, size, size, generator=g)
    tokens = torch.zeros(8, 12, dtype=torch.long)
    tokens[:, :10] = torch.randint(1, 1000, (8, 10), generator=g)
    tokens[:, 10] = 49407  # EOT: the largest id
    fp32 = get_precision("fp32", torch.device("cpu"))

    big_loss = backward_accumulated(model, [(images, tokens)], ClipLoss(), fp32, None)
    big = _grads(model)
    for k in (2, 4):
        b = 8 // k
        micro = [(images[i * b:(i + 1) * b], tokens[i * b:(i + 1) * b]) for i in range(k)]
        loss = backward_accumulated(model, micro, ClipLoss(), fp32, None)
        acc = _grads(model)
        assert abs(float(loss) - float(big_loss)) < 1e-6, k
        assert acc.keys() == big.keys() and "logit_scale" in acc
        for name, grad in big.items():
            torch.testing.assert_close(acc[name], grad, rtol=1e-4, atol=1e-6, msg=f"k={k}: {name}")


def test_logit_scale_is_clamped_after_every_step(tmp_path: Path) -> None:
    # the clamp acts on the raw (log) value; one Adam step (~lr = 1e-3) cannot move 5.0 down to 4.0 by itself
    common = dict(logit_scale_init=5.0, train__steps=2, data__num_samples=16, optim__warmup=0)
    clamped = train(tiny_recipe(tmp_path, "clamped", logit_scale_max=4.0, **common))
    free = train(tiny_recipe(tmp_path, "free", **common))
    assert 3.99 < load_train_state(clamped.last_checkpoint)["model"]["logit_scale"].item() <= 4.0
    assert load_train_state(free.last_checkpoint)["model"]["logit_scale"].item() > 4.99
    logged = [r["logit_scale"] for r in read_metrics(clamped.run_dir, "train")]
    assert logged[0] == pytest.approx(math.exp(4.0), rel=1e-6)  # the logged value is exp(raw)
    assert max(logged) <= math.exp(4.0) * (1 + 1e-6)


def test_epochs_become_steps_and_warmup_in_epochs(tmp_path: Path) -> None:
    # 48 samples / batch 8 = 6 batches per epoch; accum_freq=2 -> 3 optimiser steps per epoch.
    # train.epochs=1.5 -> ceil(4.5) = 5 steps; optim.unit=epochs with warmup=1 -> 3 warm-up steps.
    r = tiny_recipe(tmp_path, "epochs", train={"epochs": 1.5, "accum_freq": 2, "precision": "fp32", "threads": 1},
                    optim={"lr": 1e-3, "weight_decay": 0.0, "warmup": 1, "unit": "epochs", "min_lr": 1e-5})
    res = train(r)
    assert res.total_steps == 5 and res.state.step == 5
    assert (res.state.epoch, res.state.batch_in_epoch) == (1, 4) and res.state.samples_seen == 5 * 16
    logged = {rec["step"]: rec["lr/decay"] for rec in read_metrics(res.run_dir, "train")}
    # the lr logged at step s is the one its update used: the schedule at 0-based step s - 1
    want = {s: lr_at(s - 1, 1e-3, total=5, warmup=3, cooldown=0, warmup_lr=0.0, min_lr=1e-5) for s in range(1, 6)}
    assert logged == pytest.approx(want)
    assert logged[3] < logged[4] == pytest.approx(1e-3)  # still warming up at step 3, peak at step 4


def test_recipe_lr_wins_over_the_checkpoint_on_resume(tmp_path: Path) -> None:
    common = dict(train__steps=4, checkpoint={"every": 2, "keep_last": 10}, data__num_samples=32)
    train(tiny_recipe(tmp_path, "run", **common), stop_after=2)
    resumed = train(tiny_recipe(tmp_path, "run", resume="latest", optim__lr=3e-3, **common))
    assert resumed.state.step == 4
    logged = {rec["step"]: rec["lr/decay"] for rec in read_metrics(resumed.run_dir, "train")}
    kw = dict(total=4, warmup=1, cooldown=0, warmup_lr=0.0, min_lr=0.0)
    assert logged[2] == pytest.approx(lr_at(1, 1e-3, **kw))  # before the interruption: the old recipe
    assert logged[3] == pytest.approx(lr_at(2, 3e-3, **kw)) and logged[4] == pytest.approx(lr_at(3, 3e-3, **kw))
    groups = load_train_state(resumed.last_checkpoint)["optimizer"]["param_groups"]
    assert {g["name"]: g["base_lr"] for g in groups} == {"decay": 3e-3, "no_decay": 3e-3}


def test_in_training_zeroshot_is_logged_at_the_recipe_steps(tmp_path: Path) -> None:
    from image_folder_utils import make_photo_folder

    folder = tmp_path / "photos"
    written = make_photo_folder(folder, size=64, corrupt=False)
    r = tiny_recipe(tmp_path, "zs", train__steps=4, data__num_samples=16,
                    zeroshot={"kind": "folder", "path": str(folder), "every": 3, "batch_size": 8})
    res = train(r)
    records = read_metrics(res.run_dir, "zeroshot")
    assert [rec["step"] for rec in records] == [3, 4]  # every 3 steps, and always at the end
    for rec in records:
        assert rec["images"] == len(written["images"])
        for key in ("top1_pct", "top5_pct", "mean_per_class_recall_pct"):
            assert 0.0 <= rec[key] <= 100.0, (key, rec)
        assert rec["top5_pct"] == 100.0  # 5 classes: every image's label is in its top 5


@pytest.mark.dist
def test_resume_with_another_number_of_processes(tmp_path: Path) -> None:
    """1 process -> 2 gloo processes -> 1 process. Promised: the weights, optimiser state and step continue;
    ``samples_seen`` counts each step with the global batch of the process count that ran it; the RNG
    streams restart and a partly done epoch is left for the next one (its split over processes is gone)."""
    base = dict(train__steps=2, data__num_samples=32, data__batch_size=4, checkpoint={"every": 1, "keep_last": 10})
    one = train(tiny_recipe(tmp_path, "one", **base))  # 8 batches per epoch; ends mid-epoch at batch 2
    assert one.state.samples_seen == 8
    run_torchrun(["-m", "msclip", "train", "--model", TINY, "--name", "two", "--output_dir", str(tmp_path),
                  "--resume", one.last_checkpoint, "train.steps=4", "train.precision=fp32", "train.threads=1",
                  "data.kind=synthetic", "data.num_samples=32", "data.batch_size=4", "data.workers=0",
                  "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.warmup=1", "checkpoint.every=1",
                  "checkpoint.keep_last=10", "log.every=1", "log.progress=false", "log.tensorboard=false"])
    two = tmp_path / "two" / "checkpoints"
    s3 = load_train_state(two / "step_00000003.pt")
    # epoch 0 was partly done: the 2-process run starts epoch 1 (4 batches per rank), one batch in at step 3
    assert s3["world_size"] == 2 and len(s3["rng"]) == 2
    assert s3["loop"]["samples_seen"] == 8 + 8 and (s3["loop"]["epoch"], s3["loop"]["batch_in_epoch"]) == (1, 1)
    adam_steps = {int(s["step"]) for s in s3["optimizer"]["state"].values()}
    assert adam_steps == {3}  # the optimiser state came from the 1-process checkpoint

    back = train(tiny_recipe(tmp_path, "back", **{**base, "train__steps": 5}, resume=str(two / "step_00000003.pt")))
    st = back.state
    assert st.step == 5 and st.samples_seen == 16 + 2 * 4 and (st.epoch, st.batch_in_epoch) == (2, 2)
    final = load_train_state(back.last_checkpoint)
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {5}


def test_resume_at_an_epoch_boundary_is_exact(tmp_path: Path) -> None:
    # 16 samples / batch 8 = 2 steps per epoch: the step-2 checkpoint ends epoch 0 (no epoch RNG is saved,
    # the RNG at the save must be restored before epoch 1 draws its shuffle and crops)
    common = dict(train__steps=3, data__num_samples=16, checkpoint={"every": 2, "keep_last": 3})
    full = train(tiny_recipe(tmp_path, "full", **common))
    train(tiny_recipe(tmp_path, "cut", **common), stop_after=2)
    resumed = train(tiny_recipe(tmp_path, "cut", resume=str(tmp_path / "cut" / "checkpoints" / "step_00000002.pt"),
                                **common))
    assert resumed.state.step == 3 and len(resumed.losses) == 1 and resumed.losses == full.losses[2:]
    a, b = (load_train_state(r.last_checkpoint)["model"] for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokens_are_trimmed_once_per_micro_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer cuts each micro-batch to its longest caption once, on the CPU; the model's forward must not
    cut it again (on a GPU every extra trim is a device sync)."""
    calls: list[int] = []
    original = msclip.MSCLIP.trim_tokens

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape[0])
        return original(tokens)

    monkeypatch.setattr(msclip.MSCLIP, "trim_tokens", staticmethod(counting))
    train(tiny_recipe(tmp_path, "trim-once", train__steps=3, train__accum_freq=2, checkpoint__export=False))
    assert calls == [8] * 6, f"one trim_tokens call per micro-batch of 8 expected: {calls}"
