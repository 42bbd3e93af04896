"""Training recipes: typed dataclasses, strict YAML loading and dotted command-line overrides.

A recipe is a YAML mapping whose sections mirror the dataclasses below; the ``data`` section is the data
pipeline's own `msclip.data.DataSpec`. Loading goes through `msclip.typed_config`: every unknown field
and every mistyped value of a file or of the overrides (``optim.lr=1e-3``, ``--optim.lr 1e-3``) is
reported in one error. `Recipe.validate` then checks every value (ranges, choices, files) and again
reports every problem at once, before anything is written. The resolved recipe is saved in the run folder.
docs/training.md lists every field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msclip.data.common import DataSpec
from msclip.errors import MsclipError
from msclip.io import write_text
from msclip.typed_config import field_paths as _typed_field_paths
from msclip.typed_config import from_dict, read_yaml_mapping, set_dotted, update_from_dict

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "const")
UNITS = ("steps", "epochs")
ZEROSHOT_KINDS = (None, "folder", "fashion_mnist")
LOSSES = ("clip", "siglip")
COMPILE_MODES = ("off", "model", "step")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
_NOUN = "recipe field"


class RecipeError(MsclipError):
    """A recipe file or override is invalid (the message names the file, field and value)."""


@dataclass
class OptimRecipe:
    lr: float = 5e-4  # peak learning rate (>= 0), per process when scale_lr
    weight_decay: float = 0.2  # AdamW decoupled weight decay (>= 0); never on biases, norms, embeddings
    # lr of the modality-shared parameters (>= 0); null = lr, or CUSTOM.LR_SHARE of an official model yaml
    lr_shared: float | None = None
    # weight decay of the shared parameters (>= 0); null = weight_decay, or an official yaml's CUSTOM.WD_SHARE
    weight_decay_shared: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # AdamW (beta1, beta2), each in [0, 1)
    eps: float = 1e-6  # AdamW epsilon (> 0)
    scale_lr: bool = False  # lr *= global_batch / base_batch_size (official: per-GPU lr x world size)
    base_batch_size: int = 256  # the global batch at which lr applies unscaled (>= 1)
    schedule: str = "cosine"  # cosine | const
    unit: str = "steps"  # unit of warmup/cooldown: steps | epochs
    warmup: float = 0.0  # linear warm-up length in `unit`s (>= 0)
    warmup_lr: float = 0.0  # lr at the start of the warm-up (>= 0)
    min_lr: float = 0.0  # lr at the end of the cosine (>= 0)
    cooldown: float = 0.0  # final stretch held at min_lr, in `unit`s (>= 0)


@dataclass
class TrainRecipe:
    steps: int | None = None  # optimiser steps; exactly one of steps / epochs
    epochs: float | None = None  # passes over the data (> 0, may be fractional); converted to steps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, same result)
    accum_freq: int = 1  # micro-batches per optimiser step (>= 1): the step sees accum_freq x batch_size
    grad_clip_norm: float | None = None  # clip the global gradient norm to this (> 0); null = no clipping
    max_nonfinite: int = 5  # this many non-finite steps in a row stop the run
    local_loss: bool = True  # each rank scores its own rows against all gathered features (open_clip)
    gather_with_grad: bool = True  # gradients flow through the all-gather (needed for exact DDP gradients)
    deterministic: bool = False  # torch deterministic algorithms (slower; bit-reproducible runs)
    threads: int | None = None  # torch.set_num_threads; null = torch default
    loss: str = "clip"  # clip (softmax InfoNCE) | siglip (pairwise sigmoid, texts passed round a ring of ranks)
    # siglip: the learnable logit bias's start (the temperature starts at log(10) unless logit_scale_init is set)
    siglip_bias_init: float = -10.0
    # off | model | step: torch.compile the training forward (model) or forward + loss as one graph (step; with
    # accum_freq > 1 or under DDP only the forward); one graph for every text length; checkpoints unchanged
    compile: str = "off"
    compile_backend: str = "inductor"  # torch.compile backend: inductor | aot_eager | eager (the last two for debugging)
    # conv stem and parallel branch in channels_last (NHWC) memory format; off by default (see docs/training.md)
    channels_last: bool = False
    tf32: bool = True  # CUDA only: TF32 tensor-core math for fp32 matmuls and convolutions


@dataclass
class CheckpointRecipe:
    every: int = 1000  # steps; 0 = only at the end
    keep_last: int = 3  # train-state checkpoints kept (>= 1): the newest up to the one just written
    export: bool = True  # also write final weights loadable by msclip.create_model(pretrained=...)


@dataclass
class LogRecipe:
    every: int = 10  # steps between log lines (> 0)
    progress: bool = True  # progress bar on a terminal (else, and without one, a plain line every log.every steps)
    tensorboard: bool = True  # also write TensorBoard events into the run folder


@dataclass
class ZeroShotRecipe:
    kind: str | None = None  # null | folder | fashion_mnist
    path: str | None = None  # folder: ROOT/<class>/<image> (names such as `3_three` give "three")
    every: int = 0  # steps; 0 = only at the end
    num_samples: int | None = None  # evaluate on the first N images (>= 1); null = all
    # null: the kind's default set; a string: a builtin set name or a template file (as `msclip zeroshot
    # --templates`); a list: the templates themselves (each with a `{}` for the class name)
    templates: list[str] | str | None = None
    classnames: str | None = None  # folder: a class-name file (as `msclip zeroshot --classnames`)
    batch_size: int = 256  # images per forward pass of the evaluation (>= 1)


@dataclass
class Recipe:
    model: str = "msclip-s-b32"  # named config or a model YAML/JSON file
    pretrained: str | None = None  # initial weights (msclip, official or open_clip file); null = random init
    logit_scale_init: float | None = None  # raw (log) value; null keeps the model's
    logit_scale_max: float | None = None  # raw clamp after each step; null = no clamp
    name: str | None = None  # run folder name; null = <timestamp>-<model>
    output_dir: str = "runs"  # parent of the run folders
    resume: str | None = None  # null | latest (needs name) | PATH of a checkpoint or run folder
    seed: int = 0  # one seed for init, data order, augmentation and captions
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    checkpoint: CheckpointRecipe = field(default_factory=CheckpointRecipe)
    log: LogRecipe = field(default_factory=LogRecipe)
    zeroshot: ZeroShotRecipe = field(default_factory=ZeroShotRecipe)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        """Every unusable value, each as ``field=value: why`` (empty when the recipe is fine)."""
        out: list[str] = []

        def bad(name: str, value: Any, why: str) -> None:
            out.append(f"{name}={value!r}: {why}")

        def positive(name: str, value: Any, minimum: float = 0, strict: bool = True, null: bool = False) -> None:
            if value is None:
                if not null:
                    bad(name, value, "must be set")
            elif (value <= minimum) if strict else (value < minimum):
                bad(name, value, f"must be {'>' if strict else '>='} {minimum}" + (" or null" if null else ""))

        t, o, c, z = self.train, self.optim, self.checkpoint, self.zeroshot
        if (t.steps is None) == (t.epochs is None):
            out.append(f"exactly one of train.steps and train.epochs must be set (got steps={t.steps!r}, "
                       f"epochs={t.epochs!r})")
        positive("train.steps", t.steps, null=True)
        positive("train.epochs", t.epochs, null=True)
        for name, value, allowed in (("train.precision", t.precision, PRECISIONS),
                                     ("optim.schedule", o.schedule, SCHEDULES), ("optim.unit", o.unit, UNITS),
                                     ("zeroshot.kind", z.kind, ZEROSHOT_KINDS), ("train.loss", t.loss, LOSSES),
                                     ("train.compile", t.compile, COMPILE_MODES),
                                     ("train.compile_backend", t.compile_backend, COMPILE_BACKENDS)):
            if value not in allowed:
                bad(name, value, f"is not one of {', '.join(map(str, allowed)).replace('None', 'null')}")
        positive("train.accum_freq", t.accum_freq, 1, strict=False)
        positive("train.grad_clip_norm", t.grad_clip_norm, null=True)
        positive("train.threads", t.threads, 1, strict=False, null=True)
        positive("train.max_nonfinite", t.max_nonfinite, 1, strict=False)
        positive("optim.lr", o.lr, strict=False)
        positive("optim.lr_shared", o.lr_shared, strict=False, null=True)
        positive("optim.weight_decay", o.weight_decay, strict=False)
        positive("optim.weight_decay_shared", o.weight_decay_shared, strict=False, null=True)
        positive("optim.eps", o.eps)
        positive("optim.base_batch_size", o.base_batch_size, 1, strict=False)
        for name in ("warmup", "warmup_lr", "min_lr", "cooldown"):
            positive(f"optim.{name}", getattr(o, name), strict=False)
        run = {"steps": ("train.steps", t.steps), "epochs": ("train.epochs", t.epochs)}.get(o.unit)
        if run and isinstance(run[1], (int, float)) and 0 < run[1] < o.warmup + o.cooldown:  # else: plan_steps
            bad(f"optim.warmup={o.warmup!r} + optim.cooldown", o.cooldown, f"exceed {run[0]}={run[1]!r}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            bad("optim.betas", o.betas, "needs two values in [0, 1)")
        positive("checkpoint.every", c.every, strict=False)
        positive("checkpoint.keep_last", c.keep_last, 1, strict=False)
        positive("log.every", self.log.every)
        positive("zeroshot.every", z.every, strict=False)
        positive("zeroshot.batch_size", z.batch_size, 1, strict=False)
        positive("zeroshot.num_samples", z.num_samples, 1, strict=False, null=True)
        positive("logit_scale_max", self.logit_scale_max, null=True)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", self.device, "is not one of auto, cpu, cuda, cuda:N")
        if self.resume == "latest" and not self.name:
            bad("resume", self.resume, "needs a fixed run name (set name=...) to know which run to continue")
        elif self.resume not in (None, "latest") and not Path(self.resume).exists():
            bad("resume", self.resume, "no such checkpoint or run folder")
        out += self.data.problems(prefix="data.")
        out += _zeroshot_problems(z)
        out += _model_problems(self.model)
        return out

    def validate(self) -> None:
        """Raise one RecipeError listing every problem of `problems()` (nothing is written before this)."""
        problems = self.problems()
        if len(problems) == 1:
            raise RecipeError(f"recipe: {problems[0]}")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise RecipeError(f"recipe: {len(problems)} problems:\n{lines}")

    def resolve_model_defaults(self) -> None:
        """Fill what the model file decides: an official model yaml's CUSTOM.LR_SHARE / WD_SHARE set
        `optim.lr_shared` / `optim.weight_decay_shared` when the recipe leaves them null."""
        if not str(self.model).endswith((".yaml", ".yml")) or not Path(self.model).is_file():
            return  # a missing file is reported by validate()
        from msclip.official_config import load_official_yaml

        official = load_official_yaml(self.model)
        if self.optim.lr_shared is None and official.lr_share is not None:
            self.optim.lr_shared = official.lr_share
        if self.optim.weight_decay_shared is None and official.wd_share is not None:
            self.optim.weight_decay_shared = official.wd_share


def _zeroshot_problems(z: ZeroShotRecipe) -> list[str]:
    out = []
    if z.kind == "folder" and not z.path:
        out.append("zeroshot.path=None: zeroshot.kind=folder needs a folder of class sub-folders")
    if z.kind == "folder" and z.path and not Path(z.path).is_dir():
        out.append(f"zeroshot.path={z.path!r}: no such folder")
    if z.classnames is not None:
        if z.kind != "folder":
            out.append(f"zeroshot.classnames={z.classnames!r}: only used with zeroshot.kind=folder")
        elif not Path(z.classnames).is_file():
            out.append(f"zeroshot.classnames={z.classnames!r}: no such file")
    if isinstance(z.templates, list):
        if not z.templates:
            out.append("zeroshot.templates=[]: must not be empty (null uses the default set)")
        out += [f"zeroshot.templates: template {t!r} has no '{{}}' for the class name"
                for t in z.templates if "{}" not in t]
    elif isinstance(z.templates, str) and z.kind is not None:
        from msclip.eval.templates import load_templates

        try:
            load_templates(z.templates)
        except (MsclipError, ValueError) as err:  # unknown set name, missing or bad file
            out.append(f"zeroshot.templates={z.templates!r}: {err}")
    return out


def _model_problems(model: str) -> list[str]:
    from msclip.factory import get_model_config

    try:
        get_model_config(model)
    except (MsclipError, ValueError, FileNotFoundError) as err:
        return [f"model={model!r}: {err}"]
    return []


def field_paths(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every settable dotted field name, e.g. ``optim.lr`` (used to build CLI options and the docs)."""
    return _typed_field_paths(cls, prefix)


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


def set_field(recipe: Recipe, dotted: str, value: Any, source: str = "command line") -> None:
    """Set ``recipe.<dotted>`` after type-checking ``value`` (a string from the CLI or a YAML value)."""
    set_dotted(recipe, [(dotted, value)], source=source, noun=_NOUN, error=RecipeError)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults, then the YAML file (strict), then the overrides; model defaults filled; validated."""
    recipe = Recipe()
    errors: list[str] = []  # the file's and the command line's problems, reported together
    if path is not None:
        try:
            update_from_dict(recipe, read_yaml_mapping(path, "recipe file", RecipeError), source=str(path), noun=_NOUN, error=RecipeError)
        except RecipeError as err:
            errors.append(str(err))
    try:
        pairs = parse_overrides(overrides or [])
        if pairs:
            set_dotted(recipe, pairs, source="command line", noun=_NOUN, error=RecipeError)
    except RecipeError as err:
        errors.append(str(err))
    if errors:
        raise RecipeError("\n".join(errors))
    return _finish(recipe)


def recipe_from_dict(data: dict, source: str = "dict") -> Recipe:
    return _finish(from_dict(Recipe, data, source=source, noun=_NOUN, error=RecipeError))


def _finish(recipe: Recipe) -> Recipe:
    if not recipe.problems():  # a broken model yaml is reported by validate(), with the rest
        recipe.resolve_model_defaults()
    recipe.validate()
    return recipe


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
