"""Audit of the training core: the losses against hand-computed values, a skipped step under BatchNorm, one
optimiser update over micro-batches vs one big batch, the RNG state through a weights_only file, resume into
a model whose keys or shapes differ, the fp16 scaler and the mid-epoch RNG on resume, the train transform,
damaged model folders, device normalisation; and the bugs found
(fixed). Tiny toy models, CPU, one thread (< 10 s)."""
from __future__ import annotations

import copy
import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from msclip.config import PreprocessCfg
from msclip.loss import ClipLoss, SigLipLoss, make_loss
from msclip.train.distributed import DistEnv
from msclip.train.failures import NonFiniteLossError
from msclip.train.loop import LoopSettings, LoopState, StepResult, TrainLoop
from msclip.train.precision import get_precision
from msclip.train.scheduler import WarmupCosine
from msclip.train.state import TrainStateError, capture_rng, load_train_state, restore_rng

FP32 = get_precision("fp32", torch.device("cpu"))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # noqa: ANN001
    yield


# --- losses against values computed by hand -----------------------------------------------------------------

def _hand_clip(img: list[list[float]], txt: list[list[float]], s: float) -> float:
    """Symmetric InfoNCE with plain Python floats: mean over rows of -log softmax(s x_i.y_j)[i], the same over
    columns, then the mean of the two directions."""
    n = len(img)
    z = [[s * sum(a * b for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = sum(math.log(sum(math.exp(z[i][j]) for j in range(n))) - z[i][i] for i in range(n)) / n
    t2i = sum(math.log(sum(math.exp(z[i][j]) for i in range(n))) - z[j][j] for j in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_loss_equals_the_hand_computed_value_on_an_asymmetric_matrix() -> None:
    """Row and column cross-entropies differ here (the matrix is not symmetric), so a loss that used one
    direction twice, forgot the /2 or the scale would not match; with local_loss in one process it is the same."""
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1)
    s = 7.5
    want = _hand_clip(img.tolist(), txt.tolist(), s)
    # the two directions alone really differ (else the check below could not tell them apart)
    z = s * img @ txt.T
    assert abs(F.cross_entropy(z, torch.arange(3)).item() - F.cross_entropy(z.T, torch.arange(3)).item()) > 0.05
    for crit in (ClipLoss(), ClipLoss(local_loss=True), make_loss("clip", local_loss=True, gather_with_grad=False)):
        assert crit(img, txt, torch.tensor(s, dtype=torch.float64)).item() == pytest.approx(want, rel=1e-12)
    # two matching pairs, scale s: every row and column is log(1 + e^-s)
    eye = torch.eye(2, dtype=torch.float64)
    assert ClipLoss()(eye, eye, torch.tensor(3.0, dtype=torch.float64)).item() == pytest.approx(math.log1p(math.exp(-3)))


def test_siglip_loss_equals_the_hand_computed_value_with_its_bias() -> None:
    """Two orthogonal pairs, temperature t, bias b: the diagonal logits are t + b, the off-diagonal b, so the
    loss is (2 softplus(-(t + b)) + 2 softplus(b)) / 2."""
    eye = torch.eye(2)
    crit = SigLipLoss(bias_init=-1.5)
    t = 4.0
    got = crit(eye, eye, torch.tensor(t)).item()
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert got == pytest.approx((2 * softplus(-(t - 1.5)) + 2 * softplus(-1.5)) / 2, rel=1e-6)


def test_make_loss_passes_its_options_and_refuses_an_unknown_name() -> None:
    clip = make_loss("clip", rank=1, world_size=2, local_loss=True, gather_with_grad=False)
    assert (type(clip), clip.rank, clip.world_size, clip.local_loss, clip.gather_with_grad) == (ClipLoss, 1, 2, True, False)
    sig = make_loss("siglip", rank=1, world_size=3, siglip_bias_init=-4.0)
    assert (type(sig), sig.rank, sig.world_size, sig.logit_bias.item()) == (SigLipLoss, 1, 3, -4.0)
    assert clip.labels(4, torch.device("cpu")).tolist() == [4, 5, 6, 7]  # local rows offset by rank * B
    with pytest.raises(ValueError, match="unknown loss 'clap'"):
        make_loss("clap")


# --- one optimiser step, driven through TrainLoop.train_step ------------------------------------------------

class BNToy(nn.Module):
    """The interface the loop drives (model(images, tokens, trim=False) -> features + temperature), with a
    BatchNorm whose running statistics a skipped step must leave as they were."""

    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.img, self.txt = nn.Linear(5, 8), nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(5) if batchnorm else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, trim: bool = True) -> dict:
        return {"image_features": F.normalize(self.img(self.bn(images)), dim=-1),
                "text_features": F.normalize(self.txt(tokens), dim=-1), "logit_scale": self.logit_scale.exp()}


class _Log:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def log(self, kind: str, step: int, values: dict) -> None:
        self.records.append((kind, step, values))


def make_loop(model: nn.Module, *, accum: int = 1, max_nonfinite: int = 3, lr: float = 1e-2) -> TrainLoop:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = WarmupCosine(opt, total=10, warmup=0)
    settings = LoopSettings(total_steps=10, steps_per_epoch=10, global_batch=8, accum_freq=accum,
                            max_nonfinite=max_nonfinite)
    return TrainLoop(model=model, unwrapped=model, loss_fn=ClipLoss(), optimizer=opt, scheduler=sched,
                     precision=FP32, scaler=None, loader_factory=lambda epoch: [], env=DistEnv(), settings=settings,
                     logger=_Log(), save_fn=lambda st, rng: "", eval_fn=None, state=LoopState())


def _batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)


def test_a_non_finite_step_restores_batchnorm_statistics_and_leaves_the_optimiser_alone() -> None:
    """A NaN image poisons the loss and, in train mode, BatchNorm's running statistics: the step is skipped,
    weights, every buffer (running mean / var, num_batches_tracked) and Adam's state are bit-identical to
    before, the gradients are dropped; a NaN gradient behind a finite loss (clipping off) is skipped too."""
    model = BNToy()
    loop = make_loop(model)
    assert loop.train_step([_batch(0)]).ok  # Adam's state exists from here on
    before = copy.deepcopy((model.state_dict(), loop.optimizer.state_dict()))
    images, tokens = _batch(1)
    images[0, 0] = float("nan")
    result = loop.train_step([(images, tokens)])
    assert not result.ok and math.isnan(result.loss)
    for k, v in before[0].items():
        assert torch.equal(v, model.state_dict()[k]), k
    after = loop.optimizer.state_dict()["state"]
    for i, s in before[1]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], after[i][key]), (i, key)
    assert all(p.grad is None for p in model.parameters())

    handle = model.txt.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    result = loop.train_step([_batch(2)])
    handle.remove()
    assert not result.ok and math.isfinite(result.loss) and not math.isfinite(result.grad_norm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before[0].items())
    assert loop.train_step([_batch(3)]).ok  # and training goes on
    assert not torch.equal(before[0]["img.weight"], model.img.weight)


def test_non_finite_steps_are_counted_and_the_streak_stops_the_run_naming_the_last_checkpoint() -> None:
    loop = make_loop(BNToy(), max_nonfinite=2)
    loop.last_checkpoint = "runs/x/checkpoints/step_00000001.pt"
    bad, good = StepResult(float("nan"), None, False), StepResult(1.0, 0.5, True)
    loop._advance(bad)
    loop._advance(good)  # a good step ends the streak
    loop._advance(bad)
    assert (loop.state.nonfinite_total, loop.state.nonfinite_in_row, loop.state.step) == (2, 1, 3)
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row.*step 4.*step_00000001\.pt"):
        loop._advance(bad)
    assert [r[0] for r in loop.logger.records] == ["nonfinite"] * 3


def test_micro_batches_give_the_update_of_one_big_batch() -> None:
    """accum_freq=k: after one optimiser step (AdamW, weight decay, lr from the schedule) the weights equal
    those of one step on the k x B batch, the temperature's included."""
    images, tokens = _batch(4, 12)
    weights = []
    for k in (1, 3):
        model = BNToy(batchnorm=False)
        loop = make_loop(model, accum=k)
        b = 12 // k
        result = loop.train_step([(images[i * b:(i + 1) * b], tokens[i * b:(i + 1) * b]) for i in range(k)])
        assert result.ok
        weights.append((result.loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert weights[0][0] == pytest.approx(weights[1][0], abs=1e-6)
    start = BNToy(batchnorm=False).state_dict()
    for name, w in weights[0][1].items():
        assert not torch.equal(w, start[name]), name  # the step moved it
        torch.testing.assert_close(weights[1][1][name], w, rtol=1e-5, atol=1e-6, msg=name)


# --- train state: RNG and a checkpoint that does not fit -----------------------------------------------------

def test_rng_state_survives_a_weights_only_file_and_continues_every_stream(tmp_path: Path) -> None:
    from msclip.io import torch_save

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # (numpy's cached gaussian too)
    state = capture_rng()
    want = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist())
    torch_save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(loaded)
    assert (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()) == want


@pytest.fixture(scope="module")
def tiny_clip():
    import msclip

    return msclip.create_model("clip-b32-tiny")


@pytest.mark.parametrize("damage,named", [
    ("missing", r'Missing key\(s\).*"text\.token_embedding\.weight"'),
    ("extra", r'Unexpected key\(s\).*"extra\.weight"'),
    ("shape", r"size mismatch for text\.token_embedding\.weight"),
])
def test_resuming_weights_with_a_missing_extra_or_misshapen_key_names_the_key(tiny_clip, damage: str,
                                                                             named: str) -> None:
    from msclip.train.main import _load_resume
    from msclip.train.optim import build_optimizer
    from msclip.train.recipe import OptimRecipe

    model = tiny_clip
    opt = build_optimizer(model, OptimRecipe(lr=1e-3), 8)
    sched = WarmupCosine(opt, total=4)
    weights = dict(model.state_dict())
    key = "text.token_embedding.weight"
    if damage == "missing":
        weights.pop(key)
    elif damage == "extra":
        weights["extra.weight"] = torch.zeros(2)
    else:
        weights[key] = torch.zeros(3, 4)
    saved = {"step": 1, "model": weights, "model_config": model.cfg.to_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "loop": LoopState(step=1).to_dict(), "rng": [{}], "loss": {}}
    with pytest.raises(TrainStateError, match=rf"ckpt\.pt: its model state does not fit.*{named}"):
        _load_resume("ckpt.pt", saved, DistEnv(), model, opt, sched, None, ClipLoss())


# --- model folders, normalisation on the device --------------------------------------------------------------

def test_a_truncated_or_empty_weights_file_in_a_model_folder_is_an_error_naming_it(tiny_clip, tmp_path: Path) -> None:
    import msclip
    from msclip.checkpoint import CheckpointError
    from msclip.pretrained_folder import WEIGHTS_NAME

    msclip.save_pretrained(tiny_clip, tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_NAME
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b""):
        weights.write_bytes(broken)
        with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {weights}"):
            msclip.create_model(tmp_path / "m")


@pytest.mark.gpu
def test_uint8_normalisation_on_cuda_equals_the_cpu_one() -> None:
    from msclip.data.device_batch import images_to_model_input

    cfg = PreprocessCfg()
    u = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    cpu = images_to_model_input(u, "cpu", cfg.mean, cfg.std)
    gpu = images_to_model_input(u, "cuda", cfg.mean, cfg.std)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)


def test_a_mid_epoch_resume_replays_the_epoch_order_then_continues_the_saved_random_stream() -> None:
    """Resumed at batch 2 of an epoch: the loader is re-iterated from the epoch's starting RNG (same shuffle,
    same per-batch draws), the 2 done batches are skipped, and then the global RNG is the one saved at the
    checkpoint (not the one the replay left: the steps drew from it too), so what draws next continues exactly."""
    from msclip.train.loop import ResumeRng

    class Loader:
        def __iter__(self):
            for i in torch.randperm(6).tolist():  # the epoch's order, from the RNG at iter()
                yield (i, torch.rand(1).item())  # a draw per batch

    def loop_at(batch: int, rng: ResumeRng) -> TrainLoop:
        loop = make_loop(BNToy(batchnorm=False))
        loop.loader_factory = lambda epoch: Loader()
        loop.cfg = LoopSettings(total_steps=6, steps_per_epoch=6, global_batch=8)
        loop.state = LoopState(batch_in_epoch=batch)
        loop.resume_rng = rng
        return loop

    torch.manual_seed(11)
    first = loop_at(0, ResumeRng())
    it = first._epoch_batches()
    head = []
    for _ in range(2):  # two steps, each drawing from the RNG itself after its batch (dropout, say)
        head.append(next(it))
        torch.rand(2)
    saved = ResumeRng(now=capture_rng(), epoch=first.epoch_rng)
    step_draw = torch.rand(3).tolist()  # what the training step after the checkpoint draws
    rest = list(it)
    assert len(head + rest) == 6

    torch.manual_seed(999)  # a fresh process
    resumed = loop_at(2, saved)
    it = resumed._epoch_batches()
    assert torch.rand(3).tolist() == step_draw
    assert list(it) == rest


def test_resume_restores_the_fp16_gradient_scaler(tiny_clip) -> None:
    """The scaler's scale and growth tracker come back from the train state (else an fp16 run restarts at
    2**16 and re-lives its overflows)."""
    from msclip.train.main import _load_resume
    from msclip.train.optim import build_optimizer
    from msclip.train.recipe import OptimRecipe

    opt = build_optimizer(tiny_clip, OptimRecipe(lr=1e-3), 8)
    sched = WarmupCosine(opt, total=4)
    old = torch.amp.GradScaler("cpu", init_scale=1024.0)
    saved_scaler = {**old.state_dict(), "scale": 1024.0, "_growth_tracker": 7}
    saved = {"step": 1, "model": tiny_clip.state_dict(), "model_config": tiny_clip.cfg.to_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "loop": LoopState(step=1).to_dict(),
             "rng": [{"rng": capture_rng(), "epoch_rng": {}}], "loss": {}, "scaler": saved_scaler}
    fresh = torch.amp.GradScaler("cpu")
    _load_resume("ckpt.pt", saved, DistEnv(), tiny_clip, opt, sched, fresh, ClipLoss())
    assert fresh.get_scale() == 1024.0 and fresh.state_dict()["_growth_tracker"] == 7


def test_the_train_transform_uses_the_configs_crop_scale_and_gives_normalised_floats() -> None:
    from msclip.transforms import TrainTransform, image_transform

    cfg = PreprocessCfg(train_crop_scale=(0.5, 0.6))
    tf = image_transform(cfg, 16, is_train=True)
    assert isinstance(tf, TrainTransform) and tf.scale == (0.5, 0.6) and tf.size == 16
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB")
    for seed in range(5):
        torch.manual_seed(seed)
        top, left, h, w = tf.crop_box(img)
        assert 0.5 * 1200 * 0.95 <= h * w <= 0.6 * 1200 * 1.05, (h, w)  # 50-60 % of the image (+- rounding)
    out = tf(img)
    lo = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    hi = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and lo - 1e-5 <= out.min() <= out.max() <= hi + 1e-5


# --- bugs found by this audit (fixed) -----------------------------------------------------------------------

def test_a_run_whose_last_step_is_skipped_still_writes_its_final_checkpoint(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint.every=0 promises a checkpoint at the end. The skipped last step changed no weight, so the
    final state is finite and savable; without it the run folder holds exported weights but no train state,
    and resume=latest starts the whole run again from step 0."""
    from msclip.train.main import train
    from msclip.train.state import list_checkpoints
    from train_utils import tiny_recipe

    real = ClipLoss.forward
    calls = {"n": 0}

    def last_is_nan(self, img, txt, scale):  # noqa: ANN001, ANN202 - test double
        calls["n"] += 1
        loss = real(self, img, txt, scale)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(ClipLoss, "forward", last_is_nan)
    res = train(tiny_recipe(tmp_path, "lastbad", train__steps=3, data__num_samples=16, checkpoint__export=False))
    assert res.state.step == 3 and res.state.nonfinite_total == 1
    assert [s for s, _ in list_checkpoints(res.run_dir / "checkpoints")] == [3]
    assert res.last_checkpoint.endswith("step_00000003.pt")


def test_a_non_finite_siglip_bias_is_never_saved_nor_resumed(tiny_clip, tmp_path: Path) -> None:
    from msclip.train.main import CheckpointWriter
    from msclip.train.optim import build_optimizer
    from msclip.train.recipe import OptimRecipe

    loss = SigLipLoss()
    opt = build_optimizer(tiny_clip, OptimRecipe(lr=1e-3), 8, list(loss.parameters()))
    with torch.no_grad():
        loss.logit_bias.fill_(float("nan"))
    saved = {"step": 2, "optimizer": {}, "model": {}, "loss": loss.state_dict()}
    torch.save(saved, tmp_path / "step_00000002.pt")
    with pytest.raises(TrainStateError, match="logit_bias"):
        load_train_state(tmp_path / "step_00000002.pt")
    writer = CheckpointWriter(tmp_path / "run", tiny_clip, opt, WarmupCosine(opt, total=4), None, DistEnv(), 4, 2, loss)
    with pytest.raises(NonFiniteLossError, match="logit_bias"):
        writer(LoopState(step=1), {})
    assert not (tmp_path / "run" / "checkpoints").exists()


def _png(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


def test_the_eval_transform_of_a_palette_image_is_that_of_its_rgb_image() -> None:
    """`create_model_and_transforms`'s preprocess on a PIL image opened by the user (a GIF or palette PNG):
    the same tensor as for its RGB conversion, as the training fast path (crop_resize converts first) and the
    eval readers (to_rgb before the transform) give."""
    from msclip.transforms import image_transform

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB")
    palette = _png(rgb.quantize(64))
    assert palette.mode == "P"
    tf = image_transform(PreprocessCfg(), 16, is_train=False)
    torch.testing.assert_close(tf(palette), tf(palette.convert("RGB")), rtol=0, atol=1e-5)
