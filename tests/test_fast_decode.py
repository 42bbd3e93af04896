"""The fast training decode path (TrainTransform.from_encoded: box first, reduced-size JPEG decode, one
resample, uint8) against the reference PIL path (full decode + torchvision RandomResizedCrop), and the
device-decode path on the CPU (torchvision.io.decode_jpeg) and, with CUDA, on the GPU."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from byte_tokenizer import byte_tokenize
from shard_utils import write_tar
from msclip.config import PreprocessCfg
from msclip.data import DataSpec, build_train_data
from msclip.data.common import call_seeded
from msclip.data.device_batch import DeviceDecoder, PlannedBatch, images_to_model_input
from msclip.transforms import EncodedCrop, TrainTransform, UndecodableImage, decode_crops, draft_request

skdata = pytest.importorskip("skimage.data")
SIZE = 64


def encode(name: str, short_side: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A scikit-image photo resized to ``short_side`` and re-encoded (JPEG quality 90)."""
    img = Image.fromarray(getattr(skdata, name)()).convert(mode)
    w, h = img.size
    k = short_side / min(w, h)
    img = img.resize((round(w * k), round(h * k)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [encode("astronaut", 300), encode("coffee", 260), encode("camera", 410)]


def reference(tf: TrainTransform, data: bytes, seed: int) -> torch.Tensor:
    """The reference path: full decode, torchvision's RandomResizedCrop (crop, then resize), uint8."""
    rrc = T.RandomResizedCrop(tf.size, scale=tf.scale, interpolation=T.InterpolationMode.BICUBIC)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    return call_seeded(lambda im: F.pil_to_tensor(rrc(im)), full, seed)


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_crop_boxes_follow_torchvision_distribution(jpegs, scale) -> None:
    from scipy.stats import ks_2samp

    tf = TrainTransform(SIZE, scale)
    lazy = Image.open(io.BytesIO(jpegs[0]))  # header only: the fast path draws before decoding
    full = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    area = full.size[0] * full.size[1]
    ours = [call_seeded(tf.crop_box, lazy, s) for s in range(600)]
    theirs = [tuple(call_seeded(lambda im: T.RandomResizedCrop.get_params(im, list(scale), [3 / 4, 4 / 3]), full, s))
              for s in range(600, 1200)]  # other seeds: an independent sample of torchvision's boxes
    for stat in (lambda b: b[2] * b[3] / area, lambda b: math.log(b[3] / b[2]), lambda b: b[1] / full.size[0]):
        assert ks_2samp([stat(b) for b in ours], [stat(b) for b in theirs]).pvalue > 0.01
    # seeded: the same box torchvision draws on the decoded image
    assert ours[:50] == [tuple(call_seeded(lambda im: T.RandomResizedCrop.get_params(im, list(scale), [3 / 4, 4 / 3]),
                                           full, s)) for s in range(50)]


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_output_pixels_match_the_reference_path(jpegs, scale) -> None:
    tf = TrainTransform(SIZE, scale)
    for data in jpegs:
        fast = torch.stack([call_seeded(tf.from_encoded, data, s) for s in range(25)]).float()
        ref = torch.stack([reference(tf, data, s) for s in range(25)]).float()
        # paired (same seed, same box): reduced decode differs from full decode + resample by a few levels
        assert (fast - ref).abs().mean() < 4.0  # (a misplaced box gives tens of levels)
        assert (fast.mean((1, 2, 3)) - ref.mean((1, 2, 3))).abs().max() < 0.5
        assert (fast.std((1, 2, 3)) - ref.std((1, 2, 3))).abs().max() < 1.5
        # over all draws: the same brightness, contrast within 2 % (the reduced decode is a little smoother)
        assert abs(fast.mean() - ref.mean()) < 0.3 and abs(fast.std() - ref.std()) < 0.02 * ref.std()


def test_draft_decode_never_gives_fewer_pixels_than_the_crop_needs() -> None:
    tf = TrainTransform(SIZE, (0.08, 1.0))
    reductions = set()
    for name, short in (("astronaut", 257), ("coffee", 301), ("chelsea", 383), ("rocket", 511)):
        data = encode(name, short)
        for s in range(40):
            img, (top, left, h, w), red = call_seeded(tf.open_reduced, data, s)
            reductions.add(red)
            assert w / red >= SIZE and h / red >= SIZE or red == 1  # the crop keeps the output resolution
            assert (left + w) / red <= img.size[0] + 1e-9 and (top + h) / red <= img.size[1] + 1e-9
            if red < 8:  # and the reduction is the largest that keeps it (the optimisation is not timid)
                assert w / (2 * red) < SIZE or h / (2 * red) < SIZE
    assert reductions >= {1.0, 2.0, 4.0}
    # the request rule itself, at awkward sizes: PIL's draft picks the largest s = 2^k <= W // request
    for width, height, box in ((641, 479, (3, 5, 470, 600)), (452, 301, (0, 0, 256, 273)), (96, 96, (0, 0, 64, 64)),
                               (1000, 257, (0, 0, 257, 520)), (4000, 3000, (0, 0, 2900, 3900))):
        rw, rh = draft_request(width, height, box, SIZE)
        s = max(k for k in (1, 2, 4, 8) if k <= min(width // rw, height // rh))
        assert box[3] / s >= SIZE and box[2] / s >= SIZE
        assert s == 8 or box[3] / (2 * s) < SIZE or box[2] / (2 * s) < SIZE


def test_output_is_uint8_of_the_size_and_seeded(jpegs) -> None:
    tf = TrainTransform(SIZE, (0.9, 1.0))
    a, b = call_seeded(tf.from_encoded, jpegs[0], 7), call_seeded(tf.from_encoded, jpegs[0], 7)
    assert a.dtype == torch.uint8 and a.shape == (3, SIZE, SIZE) and torch.equal(a, b)
    assert not torch.equal(a, call_seeded(tf.from_encoded, jpegs[0], 8))
    for data in (encode("camera", 200, mode="L"), encode("logo", 120, "PNG", "RGBA"), encode("coins", 150, "PNG", "P")):
        out = call_seeded(tf.from_encoded, data, 1)
        assert out.dtype == torch.uint8 and out.shape == (3, SIZE, SIZE)
    pil = Image.open(io.BytesIO(jpegs[1])).convert("RGB")  # in-memory sources keep the float reference
    assert call_seeded(tf, pil, 3).dtype == torch.float32
    with pytest.raises(UndecodableImage):
        tf.from_encoded(jpegs[0][: len(jpegs[0]) // 2])


def test_uint8_batches_are_normalised_like_the_reference(jpegs) -> None:
    cfg = PreprocessCfg()
    tf = TrainTransform(SIZE, (0.9, 1.0), cfg)
    img = call_seeded(tf.from_encoded, jpegs[0], 0)
    want = T.Normalize(cfg.mean, cfg.std)(img.float() / 255)
    got = images_to_model_input(img[None], "cpu", cfg.mean, cfg.std)[0]
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)


def write_shard(path: Path, images: list[bytes]) -> None:
    write_tar(path, [m for i, data in enumerate(images)
                     for m in ((f"{i:05d}.jpg", data), (f"{i:05d}.txt", f"photo {i}".encode()))])


def test_corrupt_and_truncated_jpegs_are_skipped_and_counted(tmp_path: Path, jpegs) -> None:
    bad = [jpegs[0][: len(jpegs[0]) // 3], b"\xff\xd8 not a jpeg at all"]
    write_shard(tmp_path / "a.tar", jpegs + bad[:1] + jpegs)
    write_shard(tmp_path / "b.tar", jpegs + bad[1:])
    tf = TrainTransform(32, (0.9, 1.0))
    spec = DataSpec("webdataset", path=f"{tmp_path}/{{a,b}}.tar", num_samples=9, shuffle_buffer=0)
    info = build_train_data(spec, image_transform=tf, tokenizer=byte_tokenize, batch_size=3, workers=0)
    batches = [images for images, _ in info.loader]
    assert len(batches) == 3 and all(b.dtype == torch.uint8 and b.shape == (3, 3, 32, 32) for b in batches)
    assert info.stats.skipped_decode == 2 and info.stats.seen == 9
    # CSV rows: same rule (the row is replaced by the next one and counted)
    (tmp_path / "img").mkdir()
    lines = ["filepath,title"]
    for i, data in enumerate(jpegs + bad):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(data)
        lines.append(f"img/{i}.jpg,photo {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    info = build_train_data(DataSpec("csv", path=str(tmp_path / "pairs.csv")), image_transform=tf,
                            tokenizer=byte_tokenize, batch_size=5, workers=0)
    images, _ = next(iter(info.loader))
    assert images.dtype == torch.uint8 and info.stats.skipped_decode == 2 and info.stats.shortfall == 2


def planned(tf: TrainTransform, datas: list[bytes]) -> list:
    return [call_seeded(tf.plan_encoded, d, s) for s, d in enumerate(datas)]


def test_device_decode_path_on_the_cpu(jpegs) -> None:
    tf = TrainTransform(SIZE, (0.9, 1.0))
    items = planned(tf, jpegs)
    assert all(isinstance(it, EncodedCrop) for it in items)
    out = decode_crops(items, SIZE, "cpu")  # torchvision.io.decode_jpeg: the GPU code, run on the CPU
    for s, (img, data) in enumerate(zip(out, jpegs)):
        assert img.dtype == torch.uint8 and img.shape == (3, SIZE, SIZE)
        assert items[s].box == call_seeded(tf.crop_box, Image.open(io.BytesIO(data)), s)  # the box is the same
        assert (img.float() - reference(tf, data, s).float()).abs().mean() < 4.0
    # a batch with a PNG (finished in the worker) and a truncated JPEG (no decoder reads it)
    png = encode("coins", 150, "PNG")
    truncated = jpegs[1][: len(jpegs[1]) // 2]
    batch = PlannedBatch(planned(tf, [jpegs[0], png, truncated]))
    assert isinstance(batch.items[1], torch.Tensor)
    counts = torch.zeros(8, dtype=torch.long)
    loader = DeviceDecoder([(batch, torch.zeros(3, 4), counts)], tf, device="cpu")
    (images, _, counts), = list(loader)
    assert images.shape == (3, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert counts[0] == 1 and counts[7] == 1  # skipped_decode and shortfall: the lost image is counted
    assert torch.equal(images[0], out[0])


def test_device_decode_through_the_webdataset_loader(tmp_path: Path, jpegs) -> None:
    from msclip.data.common import shared_epoch
    from msclip.data.wds import build_wds

    write_shard(tmp_path / "a.tar", jpegs * 2)
    spec = DataSpec("webdataset", path=str(tmp_path / "a.tar"), shuffle_buffer=0, decode="gpu")  # not validated
    tf = TrainTransform(SIZE, (0.9, 1.0))
    loader, *_ = build_wds(spec, image_transform=tf, tokenizer=byte_tokenize, batch_size=3, workers=0, rank=0,
                           world_size=1, seed=0, epoch_value=shared_epoch(0))
    assert isinstance(loader, DeviceDecoder)
    loader.device = "cpu"
    images = torch.cat([b[0] for b in loader])
    assert images.shape == (6, 3, SIZE, SIZE) and images.dtype == torch.uint8
    with pytest.raises(Exception, match="TrainTransform"):
        build_wds(spec, image_transform=T.ToTensor(), tokenizer=byte_tokenize, batch_size=3, workers=0, rank=0,
                  world_size=1, seed=0, epoch_value=shared_epoch(0))


def test_decode_option_is_validated() -> None:
    assert any("decode='tpu'" in p for p in DataSpec("webdataset", path="x.tar", decode="tpu").problems())
    assert any("image-file sources" in p for p in DataSpec("synthetic", decode="gpu").problems())
    if not torch.cuda.is_available():
        assert any("needs CUDA" in p for p in DataSpec("webdataset", path="x.tar", decode="gpu").problems())
    assert DataSpec("webdataset", path="x.tar").problems() == []


@pytest.mark.gpu
def test_device_decode_on_cuda_matches_the_cpu_decode(jpegs) -> None:
    tf = TrainTransform(SIZE, (0.9, 1.0))
    items = planned(tf, jpegs)
    gpu = decode_crops(items, SIZE, "cuda")
    cpu = decode_crops(items, SIZE, "cpu")
    for g, c in zip(gpu, cpu):
        assert g.is_cuda and g.dtype == torch.uint8 and (g.cpu().float() - c.float()).abs().mean() < 2.0
    counts = torch.zeros(8, dtype=torch.long)
    bad = jpegs[0][: len(jpegs[0]) // 2]
    (images, _, counts), = list(DeviceDecoder([(PlannedBatch(planned(tf, jpegs + [bad])), None, counts)], tf))
    assert images.is_cuda and images.shape == (4, 3, SIZE, SIZE) and counts[0] == 1


def test_16_bit_grey_images_keep_their_brightness_in_every_reader(tmp_path: Path) -> None:
    """A 16-bit grey PNG is scaled to 8 bits (v / 257), not clipped white as PIL's convert("RGB") does: in the
    training decode, the plain-transform path, the eval image loader and the conversion helper."""
    import numpy as np

    from msclip.data.common import transform_image_file
    from msclip.eval.imagefolder import load_rgb
    from msclip.transforms import to_rgb

    wide = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)  # 0 .. 61380
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    (tmp_path / "grey16.png").write_bytes(buf.getvalue())
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")  # what PIL opens a 16-bit grey PNG as
        rgb = np.asarray(to_rgb(img))
    expected = np.round(wide / 257.0)
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0] - expected).max() <= 0.5
    assert np.array_equal(np.asarray(load_rgb(str(tmp_path / "grey16.png"))), rgb)
    full = TrainTransform(32, (1.0, 1.0))
    full.ratio = (1.0, 1.0)  # the whole image: its mean is the source's
    out = full.from_encoded(buf.getvalue()).float()
    assert abs(out.mean().item() - expected.mean()) < 1.0  # clipped, it would be ~255
    plain = transform_image_file(T.ToTensor(), buf.getvalue(), seed=0)
    assert abs(plain.mean().item() * 255 - expected.mean()) < 0.5
    assert to_rgb(Image.fromarray(np.full((4, 4), 200, np.int32), "I")).getpixel((0, 0)) == (200, 200, 200)
