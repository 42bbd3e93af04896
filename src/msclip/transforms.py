"""Image preprocessing derived from the model's `PreprocessCfg` (so eval matches training).

Training (`TrainTransform`) has two ways in. Called on a decoded PIL image it is the reference torchvision
pipeline (random resized crop, float tensor, normalised): the in-memory sources (Fashion-MNIST, synthetic)
use it. The image-file sources (WebDataset, CSV) hand it the encoded file instead (`from_encoded`), which
is the fast path of the same augmentation:

* the crop box is drawn first, from the image header (torchvision's `RandomResizedCrop.get_params`, so the
  box distribution, and even the box for a given seed, is torchvision's);
* a JPEG is decoded at 1/2, 1/4 or 1/8 size (libjpeg's scaled IDCT, PIL's draft mode) when the crop still
  has at least the output resolution at that size: the costliest step shrinks, the crop loses no detail;
* crop and resize are one resample (PIL's ``resize(box=...)``, sub-pixel box in the reduced image);
* the result stays uint8 CHW: normalisation runs on the device on the whole batch
  (`msclip.data.device_batch.images_to_model_input`), and the host-to-device copy is 4x smaller.

`plan_encoded` / `decode_crops` split the fast path for decoding on the GPU: the box is drawn where the
sample is read (a loader worker), the JPEG is decoded, cropped and resized on the device in a batch.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import PreprocessCfg

if TYPE_CHECKING:
    from torchvision.transforms import Compose

_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST}
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default aspect range (CLIP uses it)

Encoded = Union[bytes, str, "os.PathLike[str]", IO[bytes]]
Box = tuple[int, int, int, int]  # (top, left, height, width) in the full image's pixels


def _torchvision_transforms() -> Any:
    """torchvision.transforms, imported on first use: torchvision imports torch._dynamo, nearly as slow to
    import as torch itself, and a process that builds no transform (`msclip --help`, a study's parent,
    commands that only read files) need not pay for it."""
    from torchvision import transforms
    return transforms


def _interpolation(name: str) -> Any:
    return getattr(_torchvision_transforms().InterpolationMode, name.upper())


class UndecodableImage(Exception):
    """The encoded image could not be opened or decoded; the message says why (data sources skip it)."""

    @classmethod
    def from_error(cls, exn: BaseException) -> "UndecodableImage":
        return cls(decode_error_text(exn))


def decode_error_text(exn: BaseException) -> str:
    """`Type: message` of a decoder's error, without PIL's file object ("<_io.BytesIO object at 0x7f..>",
    "<_io.BufferedReader name='...'>"): noise, and the caller names the sample or file."""
    text = re.sub(r"\s*<_io\.\w+ (?:object at 0x[0-9a-fA-F]+|name=[^>]*)>", "", str(exn))
    return f"{type(exn).__name__}: {text}"


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit PNG / TIFF grey, 32-bit integer grey


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey scaled to 8-bit grey ("L"); any other image unchanged. PIL's own
    convert clips these at 255, which turns a 16-bit photo white. Integer images that hold only 0..255
    are taken as 8-bit already."""
    if image.mode not in _WIDE_GREY_MODES:
        return image
    pixels = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB, decoded (its file may close next): grey replicated, palette / alpha / CMYK
    converted, 16-bit grey scaled first."""
    if image.mode == "RGB":
        image.load()
        return image
    return to_8bit(image).convert("RGB")


def image_transform(cfg: PreprocessCfg, image_size: int, is_train: bool) -> Compose | TrainTransform:
    """Eval: resize (shorter side, or squash) + centre crop; train: random resized crop as in CLIP."""
    if is_train:
        return TrainTransform(image_size, tuple(cfg.train_crop_scale), cfg)
    T = _torchvision_transforms()
    interp = _interpolation(cfg.interpolation)
    if cfg.resize_mode == "squash":
        steps = [T.Resize((image_size, image_size), interpolation=interp)]
    else:
        steps = [T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size)]
    # RGB first: PIL resamples a palette image with nearest whatever filter is asked for
    return T.Compose([to_rgb, *steps, T.ToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)])


@dataclass
class EncodedCrop:
    """A JPEG left encoded for the device decoder, with its crop box already drawn (``plan_encoded``)."""

    data: torch.Tensor  # uint8 [n] file bytes
    box: Box


def _open(source: Encoded) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def draft_request(width: int, height: int, box: Box, size: int) -> tuple[int, int]:
    """The draft size that makes PIL decode at the largest reduction s in (8, 4, 2, 1) at which the crop
    ``box`` still spans ``size`` pixels each way (s * size <= box height and width).

    PIL's draft picks the largest s with ``s <= min(width // request_w, height // request_h)``; a request of
    ``(width // s, height // s)`` gives exactly s (the next reduction, 2s, would need twice the image)."""
    _, _, h, w = box
    s = next(k for k in (8, 4, 2, 1) if k * size <= min(w, h) or k == 1)
    return max(1, width // s), max(1, height // s)


class TrainTransform:
    """CLIP's training augmentation: a random resized crop (scale ``scale``, aspect 3/4..4/3) to ``size``.

    ``transform(pil_image)``: the torchvision reference, a normalised float tensor. ``from_encoded(file)``:
    the fast path (module docstring), a uint8 [3, size, size] tensor. Both draw the box from torch's default
    generator, so the data sources' per-sample seeding (``call_seeded``) makes either reproducible."""

    decodes_files = True  # the data sources hand this transform the encoded file (see data/common.py)

    def __init__(self, size: int, scale: Sequence[float], cfg: PreprocessCfg | None = None) -> None:
        cfg = cfg or PreprocessCfg()
        self.size, self.scale, self.ratio = int(size), (float(scale[0]), float(scale[1])), CROP_RATIO
        self.interpolation = cfg.interpolation
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        self._reference: Compose | None = None

    @property
    def reference(self) -> Compose:
        """The torchvision pipeline (built on first use, so a run that never calls it never imports torchvision)."""
        if self._reference is None:
            T = _torchvision_transforms()
            self._reference = T.Compose([
                to_rgb, T.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio,
                                            interpolation=_interpolation(self.interpolation)),
                T.ToTensor(), T.Normalize(mean=self.mean, std=self.std)])
        return self._reference

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, interpolation={self.interpolation!r})"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.reference(image)

    def crop_box(self, image: Image.Image) -> Box:
        """A box drawn as torchvision's RandomResizedCrop draws it; needs only the header (``image.size``)."""
        crop = _torchvision_transforms().RandomResizedCrop
        return tuple(crop.get_params(image, list(self.scale), list(self.ratio)))  # type: ignore

    def open_reduced(self, source: Encoded) -> tuple[Image.Image, Box, float]:
        """``(decoded image, box in full-image pixels, reduction s)``: the image is the full one scaled by 1/s
        (s = 1 unless it is a JPEG whose crop allows a draft decode). Raises UndecodableImage."""
        try:
            img = _open(source)
            box = self.crop_box(img)
            width = img.size[0]
            scale = 1.0
            if img.format == "JPEG":
                drafted = img.draft("RGB", draft_request(*img.size, box, self.size))
                if drafted is not None:
                    scale = width / drafted[1][2]  # draft's box: the full image in reduced pixels
            img.load()
        except Exception as exn:  # noqa: BLE001 - any failure to read the file is the file's fault
            raise UndecodableImage.from_error(exn) from None
        return img, box, scale

    def from_encoded(self, source: Encoded) -> torch.Tensor:
        """Decode (reduced where the crop allows), crop + resize: uint8 [3, size, size]."""
        img, box, scale = self.open_reduced(source)
        with img:
            return self.crop_resize(img, box, scale)

    def crop_resize(self, img: Image.Image, box: Box, scale: float = 1.0) -> torch.Tensor:
        top, left, h, w = box
        img = to_8bit(img)
        if img.mode not in ("RGB", "L"):  # palette, alpha, CMYK: resample in RGB (resize of "P" is nearest)
            img = img.convert("RGB")
        region = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        out = img.resize((self.size, self.size), _PIL_RESAMPLE[self.interpolation], box=region)
        out = to_rgb(out)  # grey is replicated after the resize: 3x less to resample
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)

    # --- decoding on the device ---------------------------------------------------------------------------
    def plan_encoded(self, source: Encoded) -> EncodedCrop | torch.Tensor:
        """For the device decoder: a JPEG -> its bytes and drawn box (header read only); any other image is
        finished here (``from_encoded``). Raises UndecodableImage for a file that is not an image."""
        data = source if isinstance(source, (bytes, bytearray)) else _read(source)
        try:
            with _open(data) as img:
                if img.format != "JPEG":
                    img.load()
                    return self.crop_resize(img, self.crop_box(img))
                box = self.crop_box(img)
        except Exception as exn:  # noqa: BLE001
            raise UndecodableImage.from_error(exn) from None
        return EncodedCrop(torch.frombuffer(bytearray(data), dtype=torch.uint8), box)

    def crop_box_on_cpu(self, item: EncodedCrop) -> torch.Tensor:
        """The PIL path for one planned JPEG with its own box (the device decoder's fallback)."""
        with _open(item.data.numpy().tobytes()) as img:
            try:
                img.load()
            except Exception as exn:  # noqa: BLE001
                raise UndecodableImage.from_error(exn) from None
            return self.crop_resize(img, item.box)


def _read(source: Encoded) -> bytes:
    if hasattr(source, "read"):
        return source.read()  # type: ignore[union-attr]
    with open(source, "rb") as f:  # type: ignore[arg-type]
        return f.read()


def decode_crops(items: Sequence[EncodedCrop], size: int, device: torch.device | str,
                 interpolation: str = "bicubic") -> list[torch.Tensor]:
    """Decode planned JPEGs on ``device`` (nvJPEG on CUDA, libjpeg on the CPU) in one call, crop each to its
    box and resize to ``size`` (antialiased, as PIL's resize is): uint8 [3, size, size] tensors on ``device``.
    Raises RuntimeError when the decoder rejects the batch (the caller retries image by image)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not items:
        return []
    with warnings.catch_warnings():  # torchvision >= 0.29 announces a move of its decoders to torchcodec
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision.*")
        decoded = decode_jpeg([it.data for it in items], mode=ImageReadMode.RGB, device=torch.device(device))
    mode = "nearest" if interpolation == "nearest" else interpolation
    out = []
    for img, it in zip(decoded, items):
        top, left, h, w = it.box
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        resized = torch.nn.functional.interpolate(crop, size=(size, size), mode=mode, antialias=mode != "nearest",
                                                  align_corners=None if mode == "nearest" else False)
        out.append(resized.squeeze(0).round_().clamp_(0, 255).to(torch.uint8))
    return out
