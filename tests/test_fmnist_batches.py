"""Fashion-MNIST's batch path (whole batches as tensors) makes the same kind of samples as the per-image path:
the same captions key for key, crop boxes from torchvision's RandomResizedCrop distribution, PIL's resize within
one grey level, uint8 images that the device normalises, every sample a pure function of (seed, epoch, index)."""
from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from byte_tokenizer import CTX, byte_tokenize, decode
from PIL import Image
from scipy.stats import ks_2samp

from msclip.config import PreprocessCfg
from msclip.data import DataSpec, build_train_data
from msclip.data import fashion_mnist as fm
from msclip.data.common import AUGMENT_SALT, mix_seed
from msclip.data.device_batch import images_to_model_input
from msclip.transforms import TrainTransform

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
PRE = PreprocessCfg()


def _idx_gz(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth garment-like blobs with texture (PIL's rounding shows on gradients, not on flat fields)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx, r = g.uniform(8, 20, (n, 1, 1)), g.uniform(8, 20, (n, 1, 1)), g.uniform(5, 12, (n, 1, 1))
    blob = 255.0 / (1.0 + np.exp(np.hypot(yy - cy, xx - cx) - r))
    return np.clip(blob * g.uniform(0.5, 1.0, (n, 1, 1)) + g.normal(0, 12, (n, 28, 28)), 0, 255).astype(np.uint8)


@pytest.fixture()
def fmnist_root(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    root.mkdir()
    for split, n in (("train", 96), ("t10k", 32)):
        _idx_gz(root / f"{split}-images-idx3-ubyte.gz", _images(n))
        _idx_gz(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv(fm.ROOT_ENV, str(root))
    return root


def _build(transform, batch_size: int = 16, workers: int = 0, seed: int = 0, epoch: int = 0):
    return build_train_data(DataSpec("fashion_mnist", batch_size=batch_size, workers=workers),
                            image_transform=transform, tokenizer=byte_tokenize, seed=seed, epoch=epoch)


def test_vectorised_seed_mixing_equals_mix_seed():
    idx = np.arange(0, 70000, 7)
    got = fm.mix_seed_array(3, 2, idx, AUGMENT_SALT)
    assert [int(v) for v in got] == [mix_seed(3, 2, int(i), AUGMENT_SALT) for i in idx]


def batch_and_torchvision_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float]
                                ) -> tuple[np.ndarray, np.ndarray]:
    """n crop boxes (top, left, h, w) on a 28 x 28 image from the batch path, and n from torchvision's."""
    ours = fm.random_resized_crop_boxes(fm.mix_seed_array(0, 0, np.arange(n), AUGMENT_SALT), 28, 28, scale, ratio)
    ref = []
    for s in range(n):
        torch.manual_seed(s)
        ref.append(T.RandomResizedCrop.get_params(torch.zeros(1, 28, 28), list(scale), list(ratio)))
    return ours, np.array(ref)


def test_crop_boxes_follow_torchvision_random_resized_crop():
    n, scale, ratio = 3000, (0.9, 1.0), (3 / 4, 4 / 3)
    ours, ref = batch_and_torchvision_boxes(n, scale, ratio)
    assert ours.dtype == np.int64 and ours.shape == (n, 4)
    assert (ours[:, 0] + ours[:, 2] <= 28).all() and (ours[:, 1] + ours[:, 3] <= 28).all() and (ours >= 0).all()
    a, b = Counter(map(tuple, ours[:, 2:])), Counter(map(tuple, ref[:, 2:]))
    tv = sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / 2 / n  # total variation of the (h, w) law
    assert tv < 0.06, tv  # ~0.03 at this n when equal; a wrong scale or ratio range gives > 0.3
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.08)  # the offsets too
    full = lambda boxes: ((boxes[:, 2] == 28) & (boxes[:, 3] == 28)).mean()
    assert abs(full(ours) - full(ref)) < 0.03
    # the draws differ between seeds (a weak hash of consecutive ints would correlate them)
    u = fm._uniforms(fm.mix_seed_array(0, 0, np.arange(n), AUGMENT_SALT), 8)
    assert np.abs(np.corrcoef(u.T) - np.eye(8)).max() < 0.1


def test_batch_path_crop_aspect_is_log_uniform_at_a_wide_scale() -> None:
    """At scale (0.08, 1) most first tries are accepted, so the box aspect follows the drawn one: log-uniform
    in torchvision, and the batch path's must match (a plain uniform aspect gives p ~ 1e-6 here)."""
    ours, ref = batch_and_torchvision_boxes(3000, (0.08, 1.0), (3 / 4, 4 / 3))

    def log_aspect(b: np.ndarray) -> np.ndarray:
        return np.log(b[:, 3] / b[:, 2])

    assert ks_2samp(log_aspect(ours), log_aspect(ref)).pvalue > 0.01  # 0.15 as it is (fixed seeds)
    assert ks_2samp(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]).pvalue > 0.01


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_batched_crop_resize_matches_pil(interpolation):
    images = _images(48, seed=1)
    boxes = fm.random_resized_crop_boxes(fm.mix_seed_array(1, np.arange(48)), 28, 28, (0.3, 1.0), (3 / 4, 4 / 3))
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    ref = torch.stack([torch.from_numpy(np.array(TF.resized_crop(Image.fromarray(im), *map(int, box), [SIZE, SIZE],
                                                                 mode))) for im, box in zip(images, boxes)])
    table = fm.resample_table(28, SIZE, interpolation)
    for tables in (None, (table, table)):
        out = fm.resized_crops(torch.from_numpy(images), torch.from_numpy(boxes), SIZE, interpolation, tables)
        assert out.dtype == torch.uint8 and out.shape == (48, SIZE, SIZE)
        diff = (out.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # PIL's fixed-point rounding, nothing more


def test_train_transform_takes_the_batch_path_with_the_per_image_captions(fmnist_root):
    train_tf = TrainTransform(SIZE, PRE.train_crop_scale, PRE)
    new = _build(train_tf)
    old = _build(lambda im: train_tf(im))  # any other transform: the per-image reference path
    assert new.details.get("batch_path") and not old.details.get("batch_path")
    assert new.num_batches == old.num_batches == 96 // 16
    n_seen = 0
    for (img_n, tok_n), (img_o, tok_o) in zip(new.loader, old.loader):
        assert img_n.dtype == torch.uint8 and img_n.shape == (16, 3, SIZE, SIZE) == img_o.shape
        assert (img_n[:, 0] == img_n[:, 1]).all() and (img_n[:, 1] == img_n[:, 2]).all()  # grey -> RGB
        assert torch.equal(tok_n, tok_o)  # same order, same template draw: same caption for every sample
        # normalised on the device with the transform's mean/std: the same kind of values as the reference
        x = images_to_model_input(img_n, "cpu", PRE.mean, PRE.std)
        assert x.dtype == torch.float32 and abs(float(x.mean() - img_o.mean())) < 0.1
        n_seen += len(img_n)
    assert n_seen == 96 and new.stats.seen == 96 and new.stats.skipped == 0
    ds = new.loader.loader.dataset
    caps = decode(ds.__getitems__([(3, i) for i in range(96)])[1])  # the per-image path's caption of each key
    assert caps == [ds.captions.caption(i, 3).encode()[:CTX].decode() for i in range(96)]
    assert len(set(caps)) > 20


def test_batches_are_a_pure_function_of_seed_epoch_and_index(fmnist_root):
    train_tf = TrainTransform(SIZE, PRE.train_crop_scale, PRE)
    ds = _build(train_tf).loader.loader.dataset
    keys = [(0, 5), (0, 17), (1, 5), (0, 40)]
    img, tok, counts = ds.__getitems__(keys)
    alone, tok_alone, _ = ds.__getitems__(keys[1:2])
    assert torch.equal(img[1], alone[0]) and torch.equal(tok[1], tok_alone[0])  # whatever else is in the batch
    assert not torch.equal(img[0], img[2])  # image 5 re-cropped in epoch 1
    assert torch.equal(img, ds.__getitems__(keys)[0]) and counts.sum() == 0
    # a loader built at epoch 1 (a resume) gives the batches an epoch-0 loader gives after set_epoch(1)
    a = _build(train_tf, epoch=0)
    a.set_epoch(1)
    b = _build(train_tf, epoch=1)
    for (ia, ta), (ib, tb) in zip(a.loader, b.loader):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    other_seed = next(iter(_build(train_tf, seed=1).loader))[0]
    assert not torch.equal(other_seed, next(iter(_build(train_tf).loader))[0])


def test_batch_path_through_a_worker_process(fmnist_root):
    train_tf = TrainTransform(SIZE, PRE.train_crop_scale, PRE)
    main = [b for b in _build(train_tf, batch_size=32).loader]
    worker = [b for b in _build(train_tf, batch_size=32, workers=1).loader]
    assert len(main) == len(worker) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(main, worker))
