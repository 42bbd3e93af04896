"""Image preprocessing derived from the model's `PreprocessCfg` (so eval matches training)."""
from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

from .config import PreprocessCfg

_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
           "nearest": T.InterpolationMode.NEAREST}


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def image_transform(cfg: PreprocessCfg, image_size: int, is_train: bool) -> T.Compose:
    """Eval: resize (shorter side, or squash) + centre crop; train: random resized crop as in CLIP."""
    interp = _INTERP[cfg.interpolation]
    norm = T.Normalize(mean=cfg.mean, std=cfg.std)
    if is_train:
        steps = [T.RandomResizedCrop(image_size, scale=tuple(cfg.train_crop_scale), interpolation=interp)]
    elif cfg.resize_mode == "squash":
        steps = [T.Resize((image_size, image_size), interpolation=interp)]
    else:
        steps = [T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size)]
    return T.Compose(steps + [_to_rgb, T.ToTensor(), norm])
