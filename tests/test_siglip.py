"""SigLipLoss: equal to the naive full-matrix sigmoid loss (value and gradients), alone, under gradient
accumulation, in the trainer. Its ring exchange across 3 gloo ranks is checked in tests/test_loss.py (one
launch for both losses)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msclip.loss import SigLipLoss
from msclip.train.loop import backward_accumulated
from msclip.train.precision import get_precision
from msclip.train.main import train
from train_utils import tiny_recipe



def naive_siglip(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The paper's formula one pair at a time: -1/N sum_ij log sigmoid(z_ij (s x_i.y_j + b))."""
    n = img.shape[0]
    terms = [F.logsigmoid((1.0 if i == j else -1.0) * (scale * img[i] @ txt[j] + bias))
             for i in range(n) for j in range(n)]
    return -torch.stack(terms).sum() / n


def features(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, 16, generator=g), dim=-1),
            F.normalize(torch.randn(n, 16, generator=g), dim=-1))


def test_init_is_the_papers() -> None:
    assert SigLipLoss().logit_bias.item() == -10.0
    assert "logit_bias" in SigLipLoss().state_dict()  # saved with the train state


def test_matches_naive_formula_value_and_gradients() -> None:
    img, txt = (t.requires_grad_() for t in features(6))
    scale = torch.tensor(math.log(10)).exp().requires_grad_()
    crit = SigLipLoss(bias_init=-3.0)  # (not -10: every pair's gradient would be tiny)
    ours = crit(img, txt, scale)
    ref = naive_siglip(img, txt, scale, crit.logit_bias)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    g_ours = torch.autograd.grad(ours, (img, txt, scale, crit.logit_bias))
    g_ref = torch.autograd.grad(ref, (img, txt, scale, crit.logit_bias))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert g_ours[3].abs() > 1e-3  # the bias does learn


class Toy(nn.Module):
    """The model interface the loop drives: model(images, tokens, trim=False) -> features + temperature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.img, self.txt = nn.Linear(5, 8), nn.Linear(5, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, trim: bool = True) -> dict:
        return {"image_features": F.normalize(self.img(images), dim=-1),
                "text_features": F.normalize(self.txt(tokens), dim=-1), "logit_scale": self.logit_scale.exp()}


def test_accumulation_gives_the_big_batch_gradients() -> None:
    """accum over 3 micro-batches == one batch of 3 x B, the bias's gradient included (counted once)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 5, generator=g)
    fp32 = get_precision("fp32", torch.device("cpu"))
    grads = []
    for micro in ([(x, y)], [(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)]):
        model, crit = Toy(), SigLipLoss(bias_init=-2.0)
        loss = backward_accumulated(model, micro, crit, fp32, None)
        grads.append([loss] + [p.grad.clone() for p in [*model.parameters(), crit.logit_bias]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_learns_saves_and_resumes_the_bias(tmp_path: Path) -> None:
    """train.loss=siglip: the temperature starts at 10, the bias is optimised (no weight decay), saved in
    the train state and restored on resume (the resumed run equals the uninterrupted one)."""
    common = dict(train__steps=3, train__loss="siglip", optim={"lr": 1e-2, "weight_decay": 0.1, "warmup": 0},
                  checkpoint={"every": 1, "keep_last": 3})
    full = train(tiny_recipe(tmp_path, "full", **common))
    first = torch.load(full.run_dir / "checkpoints" / "step_00000001.pt", weights_only=True)
    assert abs(first["model"]["logit_scale"].item() - math.log(10)) < 0.02  # one step of lr 1e-2 away
    assert list(first["loss"]) == ["logit_bias"] and first["loss"]["logit_bias"].item() != -10.0
    part = train(tiny_recipe(tmp_path, "cut", **common), stop_after=2)
    resumed = train(tiny_recipe(tmp_path, "cut", resume="latest", **common))
    assert part.losses + resumed.losses == full.losses
    a = torch.load(full.last_checkpoint, weights_only=True)
    b = torch.load(resumed.last_checkpoint, weights_only=True)
    assert torch.equal(a["loss"]["logit_bias"], b["loss"]["logit_bias"])
    assert a["loss"]["logit_bias"].item() != first["loss"]["logit_bias"].item()



def test_a_non_finite_bias_gradient_skips_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss's own parameter is in the gradient check: a NaN on the bias's gradient alone skips the step."""
    real = SigLipLoss.forward

    def nan_bias_grad(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.logit_bias.requires_grad:
            self.logit_bias.register_hook(lambda g: torch.full_like(g, float("nan")))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(SigLipLoss, "forward", nan_bias_grad)
    res = train(tiny_recipe(tmp_path, "nanbias", train__steps=2, train__loss="siglip", train__max_nonfinite=5))
    assert res.state.nonfinite_total == 2 and res.losses == []
