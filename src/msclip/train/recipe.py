"""Training recipes: typed dataclasses, strict YAML loading and dotted command-line overrides.

A recipe is a YAML mapping whose sections mirror the dataclasses below. Unknown fields are errors that
name the field and the file; overrides such as ``optim.lr=1e-3`` or ``--optim.lr 1e-3`` are parsed and
type-checked against the field's annotation. The resolved recipe is written to the run folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class RecipeError(ValueError):
    """A recipe file or override is invalid (the message names the file, field and value)."""


@dataclass
class DataRecipe:
    kind: str = "synthetic"  # webdataset | csv | fashion_mnist | synthetic
    path: str | None = None
    num_samples: int | None = None
    resampled: bool = False
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None
    image_root: str | None = None
    caption_templates: list[str] | None = None
    fashion_mnist_root: str | None = None
    batch_size: int = 32  # per process
    workers: int = 2


@dataclass
class OptimRecipe:
    lr: float = 5e-4
    weight_decay: float = 0.2
    lr_shared: float | None = None  # modality-shared parameters (official LR_SHARE); null = lr
    weight_decay_shared: float | None = None  # official WD_SHARE; null = weight_decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    scale_lr: bool = False  # lr *= global_batch / base_batch_size (official: per-GPU lr x world size)
    base_batch_size: int = 256
    schedule: str = "cosine"  # cosine | const
    unit: str = "steps"  # unit of warmup/cooldown: steps | epochs
    warmup: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    cooldown: float = 0.0  # final stretch held at min_lr


@dataclass
class TrainRecipe:
    steps: int | None = None  # optimiser steps; exactly one of steps / epochs
    epochs: float | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    accum_freq: int = 1
    grad_clip_norm: float | None = None
    max_nonfinite: int = 5  # this many non-finite steps in a row stop the run
    local_loss: bool = True
    gather_with_grad: bool = True
    deterministic: bool = False
    threads: int | None = None  # torch.set_num_threads; null = torch default


@dataclass
class CheckpointRecipe:
    every: int = 1000  # steps; 0 = only at the end
    keep_last: int = 3
    export: bool = True  # also write final weights loadable by msclip.create_model(pretrained=...)


@dataclass
class LogRecipe:
    every: int = 10
    progress: bool = True
    tensorboard: bool = True


@dataclass
class ZeroShotRecipe:
    kind: str | None = None  # null | folder | fashion_mnist
    path: str | None = None
    every: int = 0  # steps; 0 = only at the end
    num_samples: int | None = None
    templates: list[str] | None = None
    batch_size: int = 256


@dataclass
class Recipe:
    model: str = "msclip-s-b32"  # named config or a model YAML/JSON file
    pretrained: str | None = None
    logit_scale_init: float | None = None  # raw (log) value; null keeps the model's
    logit_scale_max: float | None = None  # raw clamp after each step; null = no clamp
    name: str | None = None  # run folder name; null = <timestamp>-<model>
    output_dir: str = "runs"
    resume: str | None = None  # latest | PATH
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: DataRecipe = field(default_factory=DataRecipe)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    checkpoint: CheckpointRecipe = field(default_factory=CheckpointRecipe)
    log: LogRecipe = field(default_factory=LogRecipe)
    zeroshot: ZeroShotRecipe = field(default_factory=ZeroShotRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if (self.train.steps is None) == (self.train.epochs is None):
            raise RecipeError("exactly one of train.steps and train.epochs must be set")
        checks = [
            ("train.precision", self.train.precision, {"auto", "fp32", "bf16", "fp16"}),
            ("optim.schedule", self.optim.schedule, {"cosine", "const"}),
            ("optim.unit", self.optim.unit, {"steps", "epochs"}),
            ("zeroshot.kind", self.zeroshot.kind, {None, "folder", "fashion_mnist"}),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise RecipeError(f"{key}={value!r} is not one of {sorted(map(str, allowed))}")
        if self.train.accum_freq < 1 or self.data.batch_size < 1:
            raise RecipeError("train.accum_freq and data.batch_size must be >= 1")
        if len(self.optim.betas) != 2:
            raise RecipeError(f"optim.betas needs two values, got {self.optim.betas}")


# --- type-checked coercion -------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to annotation ``tp`` or raise RecipeError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"null", "none", "~"}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads "1e-3" as a string; accept it here
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    raise RecipeError(f"{where}: unsupported field type {tp}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, known: list[str], source: str) -> RecipeError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return RecipeError(f"unknown recipe field '{key}' in {source}{hint}; known: {', '.join(known)}")


def _apply_mapping(obj: Any, data: dict, source: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {data!r}")
    hints = _hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(full, list(hints), source)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value or {}, source, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{source}: {full}"))


def set_field(recipe: Recipe, dotted: str, value: Any, source: str = "command line") -> None:
    """Set ``recipe.<dotted>`` after type-checking ``value`` (a string from the CLI or a YAML value)."""
    obj: Any = recipe
    parts = dotted.replace("-", "_").split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(obj))
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), list(hints), source)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise RecipeError(f"{source}: '{dotted}' is a section; set one of its fields")
            setattr(obj, part, _coerce(value, hints[part], f"{source}: {dotted}"))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise RecipeError(f"{source}: '{'.'.join(parts[: i + 1])}' has no sub-fields")


def field_paths(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every settable dotted field name, e.g. ``optim.lr`` (used to build CLI options)."""
    out = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += field_paths(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    """Turn ``['optim.lr=1e-3', '--train.steps', '10', '--log.every=5']`` into (key, value) pairs."""
    pairs, i = [], 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                value, i = items[i + 1], i + 1
            else:
                raise RecipeError(f"command line: option '{item}' needs a value")
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            raise RecipeError(f"command line: cannot parse override '{item}' (use key=value or --key value)")
        pairs.append((key, value))
        i += 1
    return pairs


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults, then the YAML file (strict), then overrides; validated."""
    recipe = Recipe()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: invalid YAML: {e}") from e
        _apply_mapping(recipe, data, str(path))
    for key, value in parse_overrides(overrides or []):
        set_field(recipe, key, value)
    recipe.validate()
    return recipe


def recipe_from_dict(data: dict, source: str = "dict") -> Recipe:
    recipe = Recipe()
    _apply_mapping(recipe, data, source)
    recipe.validate()
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomic: temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    tmp.replace(path)
