"""Speed options and the fast data path: behaviours the other speed tests left unguarded (found by mutating the
code). The trainer's uint8 -> model input on real image files, the trainer honouring train.channels_last and
train.deterministic, AdamW's device rule with mixed devices, CUDA backend flags (set on a CPU-only machine: they
are plain process-wide switches), batch_norm_group with BN modules whose settings differ."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from train_utils import tiny_recipe

import msclip
import msclip.train.main as train_main
from msclip.layers import batch_norm_group
from msclip.model import MSCLIP
from msclip.train.main import train
from msclip.train.optim import adamw_kernel
from msclip.train.precision import configure_backends

# flat colours: any crop + resize of a flat image is that colour, so the model input is known exactly
_COLOURS = [(0, 0, 0), (255, 255, 255), (200, 30, 90), (17, 140, 250)]


def flat_csv(root: Path) -> dict:
    """A csv data section of flat-coloured PNGs (the image-file path: TrainTransform hands out uint8 crops)."""
    (root / "img").mkdir()
    lines = ["filepath,title"]
    for i, c in enumerate(_COLOURS * 2):
        Image.new("RGB", (40, 40), c).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,colour {i}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {"kind": "csv", "path": str(root / "pairs.csv"), "batch_size": 8, "workers": 0}


def test_trainer_normalises_uint8_images_with_the_models_mean_and_std(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    original = MSCLIP.encode_image

    def recording(self: MSCLIP, images: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(images.detach().clone())
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(MSCLIP, "encode_image", recording)
    run = tiny_recipe(tmp_path, "flat", data=flat_csv(tmp_path), train__steps=1, checkpoint__export=False)
    train(run)
    assert seen, "the trainer never encoded an image"
    pre = msclip.get_model_config(run.model).preprocess
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    images = seen[0]
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 64, 64)
    # each image is flat; its value must be one colour of the set, normalised as (x / 255 - mean) / std
    expected = [(torch.tensor(c, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std for c in _COLOURS]
    for img in images:
        assert any(torch.allclose(img, e.expand_as(img), atol=1e-5) for e in expected), img[:, 0, 0]


def test_trainer_applies_channels_last_and_passes_deterministic_to_the_backend_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changed: list[list[str]] = []
    flags_calls: list[dict] = []
    set_cl, configure = train_main.set_channels_last, train_main.configure_backends
    monkeypatch.setattr(train_main, "set_channels_last", lambda m: changed.append(set_cl(m)) or changed[-1])
    monkeypatch.setattr(train_main, "configure_backends",
                        lambda dev, **kw: flags_calls.append(kw) or configure(dev, **kw))
    train(tiny_recipe(tmp_path, "nhwc", model="msclip-s-b32-tiny", train__steps=1, train__channels_last=True,
                      train__tf32=False, checkpoint__export=False))
    assert changed == [["image.stem", "image.parallel"]]
    assert flags_calls == [{"tf32": False, "deterministic": True}]  # tiny_recipe trains deterministically


def test_adamw_is_not_fused_over_mixed_or_other_devices() -> None:
    cpu, meta = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))
    assert adamw_kernel([cpu, meta]) == {"foreach": None}  # not all on one kind: torch's default
    assert adamw_kernel([meta]) == {"foreach": None}  # neither CUDA nor the CPU
    ints = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert adamw_kernel([cpu, ints]) == {"foreach": None}  # fused needs floating point


@pytest.fixture()
def saved_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _flags() -> tuple[bool, bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


def test_cuda_backend_flags_follow_tf32_and_deterministic(saved_backend_flags: None) -> None:
    # The flags are process-wide switches that need no GPU to set, so the CUDA branch runs here too.
    cuda = torch.device("cuda")
    assert configure_backends(cuda, tf32=True, deterministic=False) == \
        {"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": True}
    assert _flags() == (True, True, True)
    assert configure_backends(cuda, tf32=True, deterministic=True)["cudnn_benchmark"] is False
    assert _flags() == (True, True, False)  # cuDNN autotuning is non-deterministic: off
    configure_backends(cuda, tf32=False, deterministic=False)
    assert _flags() == (False, False, True)


@pytest.mark.parametrize("case", ["eps", "one_in_eval"])
def test_batch_norm_group_of_modules_with_different_settings(case: str, one_thread: None) -> None:
    """Grouped BN must be each module's own computation when the modules disagree (a frozen BN in eval mode,
    a different eps): outputs and running statistics."""
    norms = [nn.BatchNorm2d(3), nn.BatchNorm2d(5)]
    if case == "eps":
        norms[1].eps = 0.5  # large, so that using the first module's eps for both shows
    with torch.no_grad():
        for n in norms:  # non-trivial statistics and affine parameters
            n.running_mean.normal_()
            n.running_var.uniform_(0.5, 2.0)
            n.weight.normal_()
            n.bias.normal_()
    if case == "one_in_eval":
        norms[1].eval()
    twins = copy.deepcopy(norms)
    y = torch.randn(4, 8, 5, 5) * 0.5
    for _ in range(2):
        out = batch_norm_group(y, norms)
        expected = torch.cat([twins[0](y[:, :3]), twins[1](y[:, 3:])], 1)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    for n, t in zip(norms, twins):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(n, name), getattr(t, name), atol=1e-6, rtol=0, msg=name)
