"""The demo: its step budget fits the time left; its recipes ship in the package; its zero-shot number for a
checkpoint equals `msclip zeroshot`'s on the same checkpoint, images and templates."""
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

import msclip
from msclip import demo
from msclip.cli import main as cli_main
from msclip.data.fashion_mnist import FASHION_MNIST_CAPTION_NAMES
from msclip.train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def recipes():
    return {label: load_recipe(demo.RECIPES_DIR / fname) for label, fname in demo.RECIPES.items()}


@pytest.mark.parametrize("cores,workers,expected_threads,margin", [(2, 1, 2, 1.5), (2, 0, 2, 1.2), (8, 1, 2, 1.2)])
def test_plan_budget_fits_the_time_left(monkeypatch, recipes, cores, workers, expected_threads, margin):
    for r in recipes.values():  # a loader worker beside 2 torch threads oversubscribes 2 cores
        r.data.workers = workers
    monkeypatch.setattr(demo.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(demo, "_step_time", lambda recipe, threads: {1: 0.8, 2: 0.5}[threads])
    monkeypatch.setattr(demo, "_batch_time", lambda recipe: 0.1)
    threads, steps = demo.plan_budget(recipes, budget_s=300.0, overhead_s=75.0)
    per_step = 0.5 + 0.5 + 2 * 0.1  # both models at the faster thread count, plus their data
    assert threads == expected_threads
    assert steps == int((300 - 75) / (margin * per_step)) // 10 * 10
    assert steps * per_step * margin <= 300 - 75


def test_plan_budget_never_exceeds_the_recipes(monkeypatch, recipes):
    monkeypatch.setattr(demo, "_step_time", lambda recipe, threads: 0.001)
    monkeypatch.setattr(demo, "_batch_time", lambda recipe: 0.0)
    _, steps = demo.plan_budget(recipes, budget_s=3600.0)
    assert steps == next(iter(recipes.values())).train.steps == 400


def test_recipes_run_the_fast_settings():
    # fp32 (faster than bf16 autocast for the tiny models, and machine-independent) and no loader worker
    for fname in demo.RECIPES.values():
        r = load_recipe(demo.RECIPES_DIR / fname)
        assert (r.train.precision, r.data.workers, r.train.steps, r.data.batch_size) == ("fp32", 0, 400, 128)


def test_plan_budget_says_loudly_when_it_cuts_steps(monkeypatch, recipes, capsys):
    monkeypatch.setattr(demo, "_step_time", lambda recipe, threads: 0.5)
    monkeypatch.setattr(demo, "_batch_time", lambda recipe: 0.0)
    _, steps = demo.plan_budget(recipes, budget_s=300.0)
    assert steps < 400 and "CUTTING both runs" in capsys.readouterr().err


def test_recipes_ship_in_the_package_and_the_command_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # any folder: the recipes are found next to the code, not in the clone
    assert demo.RECIPES_DIR.parent == __import__("pathlib").Path(msclip.__file__).parent
    for fname in demo.RECIPES.values():
        assert load_recipe(demo.RECIPES_DIR / fname).zeroshot.kind == "fashion_mnist"
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out


def _idx_gz(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _fake_fashion_mnist(root, n: int = 30, seed: int = 0):
    """A Fashion-MNIST-format test split (and a tiny train split): a bright rectangle of random size, place and
    intensity on a darker background, varied enough that a random model's predictions spread over classes."""
    g = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.int64) + g.integers(0, 90, (n, 1, 1))
    for img in images:
        y0, x0 = g.integers(0, 20, 2)
        img[y0:y0 + g.integers(4, 28 - y0 + 1), x0:x0 + g.integers(4, 28 - x0 + 1)] = g.integers(120, 256)
    labels = np.arange(n) % 10
    root.mkdir()
    _idx_gz(root / "t10k-images-idx3-ubyte.gz", images)
    _idx_gz(root / "t10k-labels-idx1-ubyte.gz", labels)
    _idx_gz(root / "train-images-idx3-ubyte.gz", images[:10])
    _idx_gz(root / "train-labels-idx1-ubyte.gz", labels[:10])
    return images.astype(np.uint8), labels


def test_demo_zeroshot_equals_msclip_zeroshot(tmp_path):
    fm = tmp_path / "fmnist"
    images, labels = _fake_fashion_mnist(fm, n=200)  # enough near-ties that any numeric divergence shows
    # The same images as a labelled folder in the common <index>_<name> layout ("9_ankle boot").
    folder = tmp_path / "folder"
    for i, (img, y) in enumerate(zip(images, labels)):
        d = folder / f"{y}_{FASHION_MNIST_CAPTION_NAMES[y]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    # the CLIP recipe: its random-init model spreads predictions over classes (the random MS-CLIP-S picks one)
    recipe = load_recipe(demo.RECIPES_DIR / demo.RECIPES["CLIP"], [f"data.fashion_mnist_root={fm}"])
    torch.manual_seed(0)
    ckpt = tmp_path / "model.safetensors"
    msclip.save_pretrained(msclip.create_model(recipe.model), ckpt)

    ours = demo.final_zeroshot(msclip.create_model(recipe.model, pretrained=str(ckpt)), recipe)
    out = tmp_path / "zs.json"
    assert cli_main(["zeroshot", "--model", recipe.model, "--pretrained", str(ckpt), "--data", str(folder),
                     "--templates", "fashion_mnist", "--batch-size", "500", "--workers", "0", "--no-progress",
                     "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [c["name"] for c in rep["per_class"]] == FASHION_MNIST_CAPTION_NAMES  # index prefix dropped
    assert ours["images"] == rep["images_scored"] == len(images)
    assert ours["templates"] == rep["templates"]["count"] == 12
    for key in ("top1_pct", "top5_pct", "mean_per_class_recall_pct"):
        assert ours[key] == rep[key], key
    assert [c["correct"] for c in ours["per_class"]] == [c["correct"] for c in rep["per_class"]]
    assert sum(c["correct"] > 0 for c in rep["per_class"]) >= 2  # predictions spread: a non-trivial comparison
