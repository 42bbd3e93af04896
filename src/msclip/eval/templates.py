"""Prompt templates, the one prompt filler, and ImageNet class names for zero-shot classification.

The ImageNet class names and the 80 OpenAI templates are exactly the lists the official MS-CLIP
zero-shot script uses; open_clip_torch ships identical
copies, so they are read from its `zero_shot_metadata` rather than duplicated here (checked by sha256 in
tests/test_zeroshot.py).

Every prompt is filled by `fill_template`: plain `template.format(name)`, as the official script does
(no article rewriting: "a photo of a apple." stays, so ImageNet numbers match the official code's).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from msclip.data.formats import read_list_file
from msclip.errors import MsclipError
from msclip.open_clip_files import open_clip_module

BUILTIN_TEMPLATE_SETS = ("imagenet80", "simple", "generic", "fashion_mnist")
# Four everyday prompts that need no extra package: the default of in-training zero-shot on a folder.
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


class TemplateError(MsclipError):
    """A template set or template file is unusable; the message names it."""


def fill_template(template: str, classname: str) -> str:
    """The one prompt filler: ``template.format(classname)``, the official rule. The Fashion-MNIST
    training captions are filled the same way, so the demo's prompts are its captions."""
    return template.format(classname)


@dataclass(frozen=True)
class TemplateSet:
    name: str  # "imagenet80", "simple" or the file it was read from
    templates: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.templates).encode("utf-8")).hexdigest()

    def format(self, classname: str) -> list[str]:
        return [fill_template(t, classname) for t in self.templates]

    def describe(self) -> dict:
        return {"name": self.name, "count": len(self.templates), "sha256": self.sha256,
                "templates": list(self.templates)}


def _metadata():
    try:
        zero_shot_metadata = open_clip_module("zero_shot_metadata")
    except ImportError as e:  # the GPU image has no open_clip
        raise TemplateError(
            "the built-in ImageNet class names / templates come from open_clip_torch, which is not "
            f"installed ({e}); install it or pass --templates FILE / --classnames FILE") from e
    return zero_shot_metadata


def _as_format_strings(templates) -> tuple[str, ...]:
    # open_clip stores templates as lambdas c -> f"...{c}..."; feeding "{}" recovers the format string.
    return tuple(t("{}") if callable(t) else str(t) for t in templates)


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in wnid-sorted order (998 unique: two names repeat)."""
    return list(_metadata().IMAGENET_CLASSNAMES)


def _check(templates: tuple[str, ...], source: str) -> tuple[str, ...]:
    if not templates:
        raise TemplateError(f"template set {source!r} has no templates")
    for i, t in enumerate(templates):
        try:
            filled = t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise TemplateError(f"{source}: template {i + 1} {t!r} is not a format string with one "
                                f"'{{}}' placeholder ({e})") from e
        if filled == t:
            raise TemplateError(f"{source}: template {i + 1} {t!r} has no '{{}}' placeholder")
    return templates


def resolve_templates(spec: str | Sequence[str] | None, default: str) -> TemplateSet:
    """A recipe's or a caller's templates: None -> the builtin set `default`; a string -> load_templates;
    a list of format strings -> those (checked)."""
    if spec is None:
        return load_templates(default)
    if isinstance(spec, str):
        return load_templates(spec)
    templates = tuple(str(t) for t in spec)
    return TemplateSet("list", _check(templates, "templates list"))


def load_templates(spec: str) -> TemplateSet:
    """`imagenet80` (80 OpenAI templates), `simple` (open_clip's 7), `generic` (4 everyday prompts),
    `fashion_mnist` (the demo's 12 caption templates) or a file: one template per line with a `{}`
    placeholder (blank lines and lines starting with '#' ignored), or a JSON list."""
    if spec == "generic":
        return TemplateSet("generic", GENERIC_TEMPLATES)
    if spec == "fashion_mnist":
        from msclip.data.fashion_mnist import DEFAULT_CAPTION_TEMPLATES

        return TemplateSet("fashion_mnist", _check(tuple(DEFAULT_CAPTION_TEMPLATES), spec))
    if spec == "imagenet80":
        return TemplateSet("imagenet80", _check(_as_format_strings(_metadata().OPENAI_IMAGENET_TEMPLATES), spec))
    if spec == "simple":
        return TemplateSet("simple", _check(_as_format_strings(_metadata().SIMPLE_IMAGENET_TEMPLATES), spec))
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(f"--templates {spec!r} is neither one of {', '.join(BUILTIN_TEMPLATE_SETS)} "
                            "nor an existing file")
    data = read_list_file(path, "template file", TemplateError)
    if path.suffix.lower() == ".json":
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise TemplateError(f"{path}: a JSON template file must hold a list of strings")
        templates = tuple(data)
    else:
        templates = tuple(line for line in data if line and not line.startswith("#"))
    return TemplateSet(str(path), _check(templates, str(path)))
