"""Small labelled folders of real photos (scikit-image samples) plus deliberately bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# class folder -> scikit-image sample photos (all load offline)
PHOTOS = {"astronaut": ["astronaut"], "cat": ["chelsea"], "coffee_mug": ["coffee"], "rocket": ["rocket"],
          "camera_man": ["camera"]}


def _photo(name: str, size: int) -> Image.Image:
    from skimage import data

    img = Image.fromarray(np.asarray(getattr(data, name)()))
    img.thumbnail((size, size))  # small files keep the tests fast; the model resizes anyway
    return img


def make_photo_folder(root: Path, size: int = 96, corrupt: bool = True) -> dict:
    """ROOT/<class>/{0,1}.png (photo and its mirror image); with `corrupt`, also a garbage
    cat/broken.png (must be skipped), a truncated cat/truncated.jpg (must load) and a
    non-image notes.txt (ignored). Returns what was written."""
    written: dict = {"images": [], "corrupt": [], "truncated": []}
    for cls, names in PHOTOS.items():
        folder = root / cls
        folder.mkdir(parents=True)
        for name in names:
            img = _photo(name, size)
            for k, im in enumerate((img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
                path = folder / f"{name}_{k}.png"
                im.save(path)
                written["images"].append(path)
    if corrupt:
        bad = root / "cat" / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 10)
        written["corrupt"].append(bad)
        trunc = root / "cat" / "truncated.jpg"
        write_truncated_jpeg(_photo("chelsea", size), trunc)
        written["truncated"].append(trunc)
        (root / "cat" / "notes.txt").write_text("not an image; ignored by extension")
    return written


def write_truncated_jpeg(img: Image.Image, path: Path, keep: float = 0.6) -> None:
    img.convert("RGB").save(path, quality=90)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
