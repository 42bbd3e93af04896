"""Labelled image folders for evaluation, robust to bad files.

Layout and label order follow torchvision's ImageFolder (class = sorted sub-folder name, files found
by extension, recursively), which is what the official MS-CLIP zero-shot script uses. Differences:
an unreadable or corrupt image never crashes a run; it is skipped, counted and its path recorded.
Truncated images load the way the official loader does (`ImageFile.LOAD_TRUNCATED_IMAGES = True`).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageFile
from torch.utils.data import Dataset

from msclip.data.formats import IMAGE_EXTENSIONS, is_image_file, read_list_file
from msclip.errors import MsclipError
from msclip.transforms import to_rgb

from .features import SafeDataset

WNID_RE = re.compile(r"n\d{8}")
INDEX_PREFIX_RE = re.compile(r"(\d+)_(.+)")  # "3_three", "9_ankle boot"
NUM_IMAGENET_CLASSES = 1000


class DataError(MsclipError):
    """The data folder or class-name file is unusable; the message names the path at fault."""


@dataclass
class FolderIndex:
    root: str
    classes: list[str]  # sub-folder names, sorted
    samples: list[tuple[str, int]]  # (path, class index), ImageFolder order


def is_hidden(name: str) -> bool:
    # .ipynb_checkpoints, .git, macOS's .DS_Store and ._* AppleDouble files: never data, and a hidden folder
    # taken as a class would shift every class index after it
    return name.startswith(".")


def walk_images(folder: str) -> list[str]:
    """Every image file under `folder`, recursively, sorted as torchvision's ImageFolder lists them."""
    # The traversal and order of torchvision.datasets.folder.make_dataset, without hidden files and folders.
    found = []
    for dirpath, dirnames, fnames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found.append((dirpath, [f for f in fnames if is_image_file(f) and not is_hidden(f)]))
    return [os.path.join(dirpath, f) for dirpath, fnames in sorted(found) for f in sorted(fnames)]


def scan_image_folder(root: str | os.PathLike) -> FolderIndex:
    """Index ROOT/<class>/**/<image>. Errors (before any work) on a missing root, a root without
    class folders, or class folders without images (all of them named)."""
    root = str(root)
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
    if not classes:
        raise DataError(f"data folder {root!r} has no class sub-folders (expected ROOT/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    empty = []
    for idx, cls in enumerate(classes):
        files = walk_images(os.path.join(root, cls))
        if not files:
            empty.append(cls)
        samples.extend((p, idx) for p in files)
    if empty:
        shown = ", ".join(empty[:10]) + (f" ... ({len(empty)} in all)" if len(empty) > 10 else "")
        raise DataError(f"data folder {root!r}: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): "
                        f"{shown}")
    return FolderIndex(root, classes, samples)


def scan_images(root: str | os.PathLike) -> list[str]:
    """Every image under ROOT (recursively, sorted), for unlabelled embedding export."""
    root = str(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a folder")
    files = walk_images(root)
    if not files:
        raise DataError(f"image folder {root!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


# ---------------------------------------------------------------------------------- class names
def is_imagenet_folder(classes: list[str]) -> bool:
    return len(classes) == NUM_IMAGENET_CLASSES and all(WNID_RE.fullmatch(c) for c in classes)


def folder_classnames(classes: list[str]) -> list[str]:
    """Class names read from folder names: when every folder is `<index>_<name>` (`0_zero`, `9_ankle boot`)
    the index prefix is dropped; underscores are read as spaces (`ankle_boot` -> "ankle boot")."""
    matches = [INDEX_PREFIX_RE.fullmatch(c) for c in classes]
    if classes and all(matches):
        classes = [m.group(2) for m in matches]
    return [c.replace("_", " ").strip() for c in classes]


def resolve_classnames(classes: list[str], classnames_file: str | None = None) -> tuple[list[str], str]:
    """Class names for the sorted class folders, and where they came from.

    * `classnames_file`: one name per line (count must equal the folder count), a JSON list, or a
      JSON object folder -> name (may hold extra keys, e.g. all 1000 wnids for a subset folder);
    * otherwise 1000 folders named like ImageNet wnids -> the 1000 ImageNet class names;
    * otherwise `folder_classnames` (index prefix dropped, underscores read as spaces).
    """
    if classnames_file is not None:
        return _names_from_file(classes, classnames_file), str(classnames_file)
    if is_imagenet_folder(classes):
        from .templates import imagenet_classnames
        return imagenet_classnames(), "imagenet-1k"
    return folder_classnames(classes), "folder-names"


def _names_from_file(classes: list[str], path_str: str) -> list[str]:
    data = read_list_file(path_str, "class-name file", DataError)
    if Path(path_str).suffix.lower() == ".json":
        if isinstance(data, dict):
            missing = [c for c in classes if c not in data]
            if missing:
                raise DataError(f"class-name file {path_str!r} has no name for folder(s) "
                                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
            return [str(data[c]) for c in classes]
        if not isinstance(data, list):
            raise DataError(f"class-name file {path_str!r} must hold a JSON list or a folder -> name object")
        names = [str(n) for n in data]
    else:
        names = list(data)
        while names and not names[-1]:  # tolerate trailing blank lines only
            names.pop()
    if len(names) != len(classes):
        raise DataError(f"class-name file {path_str!r} has {len(names)} names but the data folder has "
                        f"{len(classes)} class folders")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise DataError(f"class-name file {path_str!r}: empty name on line(s) {blank[:10]}")
    return names


# ---------------------------------------------------------------------------------- loading
@contextmanager
def _truncated_images_allowed() -> Iterator[None]:
    # Per-load rather than a permanent global switch, so importing msclip changes nothing else.
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def load_rgb(path: str) -> Image.Image:
    """PIL RGB image, loaded as the official (torchvision pil_loader + truncated images) does."""
    with open(path, "rb") as f, _truncated_images_allowed():
        img = Image.open(f)
        return to_rgb(img)


class ImagePaths(Dataset):
    """(PIL image, label) per path, loaded with `load_rgb`; wrap it in features.SafeDataset."""

    def __init__(self, paths: list[str], labels: list[int] | None = None):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_rgb(self.paths[i]), (self.labels[i] if self.labels is not None else None)


def folder_dataset(index: FolderIndex, transform: Callable) -> SafeDataset:
    """The images of a scanned folder, labelled, for the feature loop (failures are skipped and counted)."""
    return SafeDataset(ImagePaths([p for p, _ in index.samples], [y for _, y in index.samples]), transform)
