"""A model folder that describes itself: `config.json`, `model.safetensors`, `preprocess.json`, `README.md`.

`save_pretrained(model, DIR)` writes it; `create_model(DIR)` / `create_model_and_transforms(DIR)` load it
with nothing else given (factory.py asks `is_model_folder`). A path ending in a weights suffix
(`.safetensors`, `.pt`, ...) is the single-file checkpoint of `checkpoint.save_pretrained` instead.

`preprocess_spec` is the one description of what a deployment must do before the encoders (image size,
mean / std, interpolation, tokenizer, context length, truncation); the ONNX export writes the same dict.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from . import io
from .checkpoint import embedded_config, save_pretrained as save_weights_file, weights_writer
from .config import ConfigError, ModelCfg, read_json_object
from .errors import MissingFileError, MsclipError
from .version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESS_NAME = "preprocess.json"
CARD_NAME = "README.md"
FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # single-file checkpoints, not folders
# The BPE vocabulary the tokenizer uses (tokenizer.py takes it from open_clip_torch).
TOKENIZER_NAME = "openai-clip-bpe-49408"
SOT_TOKEN_ID, EOT_TOKEN_ID = 49406, 49407


def is_model_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def preprocess_spec(cfg: ModelCfg) -> dict[str, Any]:
    """What a deployment must do to inputs, and what the encoders return."""
    p, size = cfg.preprocess, cfg.vision.image_size
    resize = (f"resize the shorter side to {size}, then centre-crop {size}x{size}" if p.resize_mode == "shortest"
              else f"resize (squash) to {size}x{size}")
    rule = ("over-long texts are cut to context_length tokens and the last becomes EOT"
            if cfg.text.truncate == "eot" else
            "over-long texts are cut to the first context_length tokens, with no EOT (official MS-CLIP)")
    return {
        "image": {"input_size": [size, size], "channels": "RGB", "layout": "NCHW float32",
                  "resize_mode": p.resize_mode, "resize": resize, "interpolation": p.interpolation,
                  "scale": "pixel / 255", "mean": list(p.mean), "std": list(p.std)},
        "text": {"tokenizer": TOKENIZER_NAME, "lowercase": True, "context_length": cfg.text.context_length,
                 "vocab_size": cfg.text.vocab_size, "sot_token_id": SOT_TOKEN_ID, "eot_token_id": EOT_TOKEN_ID,
                 "pad_token_id": 0, "truncate": cfg.text.truncate, "truncation_rule": rule,
                 "pooling": "the position of the largest token id (EOT) of each row",
                 "dtype": "int64"},
        "embed_dim": cfg.embed_dim,
        "features": "unnormalised; L2-normalise both before taking cosine similarities",
    }


# ---------------------------------------------------------------------------------------------- writing
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, recipe: Any = None, data: Any = None,
                    results: dict | None = None) -> Path:
    """Write a model folder (or, for a path ending in .safetensors / .pt / ..., one weights file).

    `recipe` / `data` (a dataclass, a dict or text) and `results` ({metric: value}) go into the model card.
    """
    path = Path(path)
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    if path.suffix in FILE_SUFFIXES:
        if recipe is not None or data is not None or results is not None:
            raise MsclipError(f"{path}: a single weights file has no model card for recipe / data / results; "
                              f"give a folder path instead")
        save_weights_file(model, path)
        return path
    if path.exists() and not path.is_dir():
        raise MsclipError(f"{path} exists and is not a folder")
    cfg = model.cfg
    card = model_card(model, recipe=recipe, data=data, results=results)
    # The weights file also carries the config in its metadata, so it works alone as --pretrained. The four
    # files are written together: a failed write (a full disk) leaves an earlier export in the folder whole.
    files = [(WEIGHTS_NAME, weights_writer(model, path / WEIGHTS_NAME)),
             (PREPROCESS_NAME, io.json_writer(preprocess_spec(cfg))), (CARD_NAME, io.bytes_writer(card.encode())),
             (CONFIG_NAME, io.json_writer(cfg.to_dict()))]  # renamed last: a folder with a config is complete
    io.remove_stale_temporaries(path, [name for name, _ in files])
    io.atomic_write_many([(path / name, write) for name, write in files])
    return path


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _block(obj: Any) -> str:
    obj = _plain(obj)
    if isinstance(obj, str):
        return f"```\n{obj.strip()}\n```"
    return "```json\n" + json.dumps(obj, indent=2, default=str) + "\n```"


def _layer_ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(out)


def sharing_summary(cfg: ModelCfg) -> list[str]:
    """One line per run of layers with the same shared components (trunk layer indices)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for layer in range(cfg.num_layers):
        groups.setdefault(tuple(sorted(cfg.shared_components(layer))), []).append(layer)
    lines = []
    for comps, layers in groups.items():
        what = ", ".join(comps) if comps else "nothing (each modality has its own weights)"
        noun = "layer" if len(layers) == 1 else "layers"
        lines.append(f"{noun} {_layer_ranges(layers)}: {what}")
    return lines


def model_card(model: nn.Module, *, recipe: Any = None, data: Any = None, results: dict | None = None) -> str:
    cfg: ModelCfg = model.cfg
    v, t = cfg.vision, cfg.text
    counts = model.parameter_counts()
    stem = (f"residual conv stem (replaces trunk slot 0), strides {cfg.stem_strides()}" if v.stem == "conv"
            else f"{v.patch_size}x{v.patch_size} patchify conv")
    lines = [f"# {cfg.name or 'msclip model'}", "",
             f"An msclip dual encoder (msclip {__version__}). Load it with `msclip.create_model(\"<this folder>\")`"
             f" or `msclip.create_model_and_transforms(\"<this folder>\")`; `preprocess.json` says how to "
             f"prepare inputs for other runtimes.", "", "## Architecture", "",
             f"- image: {v.image_size}x{v.image_size} input, {stem}, {cfg.grid_size()}x{cfg.grid_size()} token "
             f"grid, width {v.width}, {len(cfg.modality_layers('image'))} trunk blocks "
             f"(of {cfg.num_layers}), {v.heads} heads",
             f"- text: context {t.context_length}, vocabulary {t.vocab_size}, width {t.width}, "
             f"{len(cfg.modality_layers('text'))} causal trunk blocks, {t.heads} heads, truncation "
             f"`{t.truncate}`, pooled at the EOT token",
             f"- embedding size {cfg.embed_dim} (both towers project to it; features are unnormalised)"]
    if cfg.parallel is not None:
        lines.append(f"- parallel conv branch with lateral adapters before trunk layers "
                     f"{list(cfg.parallel.lateral_layers)}")
    lines += ["", "## What is shared between the modalities", ""] + [f"- {s}" for s in sharing_summary(cfg)]
    lines += ["", "## Parameters", "", "| group | parameters |", "|---|---:|"]
    for key, label in (("shared", "shared"), ("image", "image-only"), ("text", "text-only"),
                       ("other", "other (temperature)"), ("total", "total"),
                       ("image_encoder", "image encoder (shared + image-only)"),
                       ("text_encoder", "text encoder (shared + text-only)")):
        lines.append(f"| {label} | {counts[key]:,} |")
    lines += ["", "## Training recipe", "", _block(recipe) if recipe is not None else "Not recorded."]
    lines += ["", "## Training data", "", _block(data) if data is not None else "Not recorded."]
    lines += ["", "## Evaluation results", ""]
    if results:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {json.dumps(_plain(val), default=str) if not isinstance(val, float) else f'{val:.4g}'} |"
                  for k, val in results.items()]
    else:
        lines.append("None given.")
    lines += ["", "## Files", "",
              f"- `{CONFIG_NAME}`: the full model config (strictly checked on load)",
              f"- `{WEIGHTS_NAME}`: the weights (msclip key layout; the config is in its metadata too)",
              f"- `{PREPROCESS_NAME}`: image and text preprocessing for deployment", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading
def _need(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise MissingFileError(f"model folder {folder} has no {name} (a folder written by "
                               f"msclip.save_pretrained holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    return path


def load_folder_config(folder: str | os.PathLike) -> ModelCfg:
    """`config.json` of a model folder -> ModelCfg (unknown keys and bad values are errors)."""
    folder = Path(folder)
    path = _need(folder, CONFIG_NAME)
    data = read_json_object(path)
    if not data.get("name"):
        data = {**data, "name": folder.resolve().name}
    return ModelCfg.from_dict(data, source=str(path))


def folder_weights(folder: str | os.PathLike) -> Path:
    return _need(Path(folder), WEIGHTS_NAME)


def is_weights_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and Path(path).suffix in FILE_SUFFIXES


def load_embedded_config(weights: str | os.PathLike) -> ModelCfg:
    """The config stored in one of msclip's weights files (`save_pretrained`, a training run's
    `model.safetensors` or train state); other layouts carry none, which is an error saying what to pass."""
    data = embedded_config(weights)
    if data is None:
        raise ConfigError(f"{weights} has no embedded model config (only msclip's own weights files carry one); "
                          "pass a model name or config as the model and this file as the weights")
    if not data.get("name"):
        data = {**data, "name": Path(weights).stem}
    return ModelCfg.from_dict(data, source=f"{weights} (embedded config)")


def folder_config(folder: str | os.PathLike) -> ModelCfg:
    """A model folder's `config.json`, or for a folder with only `model.safetensors` (a training run's) the
    config embedded in it."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        return load_embedded_config(folder / WEIGHTS_NAME)
    return load_folder_config(folder)
