"""File formats shared by training and evaluation: image extensions, IDX arrays, WebDataset captions.

One definition each, so a folder, a shard and a dataset file are read the same way everywhere.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msclip.errors import MsclipError
from msclip.io import parse_user_json, read_user_text

# Image files recognised in folders (the torchvision ImageFolder set, lower-case, with the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# WebDataset member extensions that hold an image (first match wins).
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# JSON fields that may hold the caption(s) of a WebDataset sample, in order of preference.
JSON_CAPTION_FIELDS = ("captions", "caption", "text")


class DataFormatError(MsclipError):
    """A data file is not in the format it claims; the message names the file."""


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMAGE_EXTENSIONS)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST / Fashion-MNIST; gzipped or not) -> uint8 array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataFormatError(f"{path}: cannot read IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFormatError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=header)
    if arr.size != int(np.prod(shape)):
        raise DataFormatError(f"{path}: truncated IDX file ({arr.size} values for shape {shape})")
    return arr.reshape(shape)


@dataclass
class Captions:
    """The caption(s) of one WebDataset sample, or why there is none."""

    texts: list[str] = field(default_factory=list)
    problem: str | None = None  # None | "missing" | "empty" | "bad_encoding" | "bad_json"


def _decode(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig")  # a leading BOM (Windows editors) is not part of the caption
    except UnicodeDecodeError:
        return None


def wds_captions(sample: dict, *, one_per_line: bool = False) -> Captions:
    """Captions of a WebDataset sample from its `.txt` or `.json` member.

    `.txt`: the whole text (training) or one caption per non-blank line (`one_per_line`, retrieval).
    `.json`: a string or list under "captions" / "caption" / "text".
    """
    if "txt" in sample:
        text = _decode(sample["txt"])
        if text is None:
            return Captions(problem="bad_encoding")
        texts = [ln.strip() for ln in text.splitlines()] if one_per_line else [text.strip()]
        texts = [t for t in texts if t]
        return Captions(texts, None if texts else "empty")
    if "json" in sample:
        text = _decode(sample["json"])
        if text is None:
            return Captions(problem="bad_encoding")
        try:
            meta = json.loads(text)
        except ValueError:
            return Captions(problem="bad_json")
        if not isinstance(meta, dict):
            return Captions(problem="bad_json")
        for key in JSON_CAPTION_FIELDS:
            value = meta.get(key)
            values = [value] if isinstance(value, str) else value if isinstance(value, list) else None
            if values is not None:
                texts = [v.strip() for v in values if isinstance(v, str) and v.strip()]
                return Captions(texts, None if texts else "empty")
        return Captions(problem="missing")
    return Captions(problem="missing")


def read_list_file(path: str | os.PathLike, what: str, error: type[MsclipError] = DataFormatError) -> object:
    """A user's list file (class names, templates): a `.json` file -> its parsed value; any other file ->
    its lines, stripped (callers decide about blank lines and comments). Errors name `what` and the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    text = read_user_text(path, what, error)  # a BOM would stick to the first name: dropped there
    if path.suffix.lower() != ".json":
        return [line.strip() for line in text.splitlines()]
    return parse_user_json(text, path, what, error)
