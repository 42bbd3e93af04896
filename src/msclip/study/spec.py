"""The study file: typed dataclasses, strict loading (every unknown key at once, with "did you mean"),
packaged presets, dotted overrides, and validation of every run's recipe before any folder is made.

A study is a list of model configs, one training recipe applied identically to each (the study sets
only `model`, `seed`, `name` and `output_dir` per run), a list of seeds, the evaluations to run and an
output folder. Each model x seed is an ordinary `msclip train` run folder below ``<output>/runs/``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msclip.errors import MsclipError
from msclip.io import write_text
from msclip.train.recipe import Recipe, RecipeError, parse_overrides
from msclip.typed_config import read_yaml_mapping, set_dotted, update_from_dict

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # package data: found from any working directory
# The sharing spectrum of issue 13, from two towers to everything shared, then MS-CLIP-S's two additions
# (alone and together) and the depth placement of the sharing.
DEFAULT_SPECTRUM = ["clip-b32", "clip-b32-t768", "msclip-b32-attn", "msclip-b32-mlp", "msclip-b32",
                    "msclip-b32-all", "msclip-b32-es", "msclip-b32-pb", "msclip-s-b32", "msclip-b32-bottom",
                    "msclip-b32-top"]
EVAL_DATA = ("fashion_mnist", "synthetic")
PER_RUN_FIELDS = ("model", "seed", "name", "output_dir", "resume")  # the study sets these, per run
_NOUN = "study field"


class StudyError(MsclipError):
    """A study file, preset or override is invalid (the message names the file, field and value)."""


@dataclass
class EvalSpec:
    data: str = "fashion_mnist"  # labelled held-out data: fashion_mnist (test split) | synthetic
    fashion_mnist_root: str | None = None  # null = the recipe's data.fashion_mnist_root, else the default
    zeroshot: bool = True  # zero-shot top-1 / top-5 on the held-out images
    linear_probe: bool = True  # the `clip` protocol (eval/linear_probe.py) on pre-projection image features
    modality: bool = True  # modality gap of the embeddings and per-layer NMI (analysis/modality.py)
    # held-out captions for image<->text retrieval R@1/5/10 (CSV/TSV, Karpathy JSON or WebDataset shards,
    # as `msclip retrieval --annotations`); null = none (Fashion-MNIST has no held-out captions)
    retrieval: str | None = None
    retrieval_images: str | None = None  # images root of Karpathy JSON annotations
    test_samples: int = 2000  # held-out images (evenly spread over the split) for zero-shot and the probe test
    probe_train_samples: int = 2000  # train-split images the probe is fitted on (evenly spread)
    modality_samples: int = 500  # of the held-out images, each with one caption, for the gap and NMI
    templates: list[str] | str | None = None  # zero-shot prompts; null = the data's default set
    batch_size: int = 256  # images per forward pass (>= 1)
    probe_max_iter: int = 1000  # L-BFGS iterations per probe fit (>= 1)


@dataclass
class StudySpec:
    name: str = "study"  # the study's folder below output_dir
    output_dir: str = "studies"
    models: list[str] = field(default_factory=lambda: list(DEFAULT_SPECTRUM))  # named configs or config files
    baseline: str | None = None  # the two-tower reference of the difference intervals; null = models[0]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipe_file: str | None = None  # base training recipe (relative to the study file); `recipe` overrides it
    recipe: dict = field(default_factory=dict)  # recipe fields (as in a recipe YAML), applied to every run
    eval: EvalSpec = field(default_factory=EvalSpec)
    # (filled by loading, not a file field: where relative paths of the study file are resolved)
    source: str = ""

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def baseline_model(self) -> str:
        return self.baseline or self.models[0]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


@dataclass
class RunPlan:
    model: str
    seed: int
    name: str  # run folder name below <study>/runs
    run_dir: Path
    recipe: Recipe


def run_name(model: str, seed: int) -> str:
    return f"{Path(model).stem if model.endswith(('.json', '.yaml', '.yml')) else model}-seed{seed}"


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise StudyError(f"unknown study preset {name!r}; known: {', '.join(known)}")
    return path


def load_study(path: str | Path | None = None, overrides: list[str] | None = None, *,
               preset: str | None = None) -> StudySpec:
    """Defaults, then the study file or preset (strict), then ``key=value`` overrides (``recipe.train.steps=50``
    reaches the recipe); every problem of the file, the overrides, the recipe and the runs reported at once."""
    if path is not None and preset is not None:
        raise StudyError("give a study file or a preset, not both")
    path = preset_path(preset) if preset else (Path(path) if path is not None else None)
    errors: list[str] = []
    spec = StudySpec()
    if path is not None:
        raw = read_yaml_mapping(path, "study file", StudyError)
        try:
            update_from_dict(spec, raw, source=str(path), noun=_NOUN, error=StudyError)
        except StudyError as err:
            errors.append(str(err))
            # keep checking the recipe, so that its problems are reported with the study's
            spec.recipe = raw["recipe"] if isinstance(raw.get("recipe"), dict) else {}
            spec.recipe_file = raw["recipe_file"] if isinstance(raw.get("recipe_file"), str) else None
        spec.source = str(path)
    recipe_items: list[str] = []
    try:
        pairs = parse_overrides(overrides or [])
        recipe_items = [f"{k[len('recipe.'):]}={v}" for k, v in pairs if k.startswith("recipe.")]
        study_pairs = [(k, v) for k, v in pairs if not k.startswith("recipe.")]
        if study_pairs:
            set_dotted(spec, study_pairs, source="command line", noun=_NOUN, error=StudyError)
    except (StudyError, RecipeError) as err:
        errors.append(str(err))
    base = None
    try:
        base = base_recipe(spec, recipe_items)
    except RecipeError as err:
        errors.append(str(err))
    errors += spec_problems(spec, base)
    if base is not None and not errors:
        errors += [p for plan in plan_runs(spec, base) for p in _run_problems(plan)]
    if errors:
        raise StudyError("study: " + "\n".join(dict.fromkeys(errors)))  # (a problem shared by runs, once)
    return spec


def base_recipe(spec: StudySpec, overrides: list[str] | None = None) -> Recipe:
    """The shared recipe: `recipe_file`, then the `recipe` mapping (strict), then ``recipe.*`` overrides, which
    are folded into `spec.recipe` so that the resolved study file reproduces them."""
    recipe = Recipe()
    errors = []
    if spec.recipe_file:
        file = Path(spec.recipe_file)
        if not file.is_absolute() and spec.source:
            file = Path(spec.source).parent / file
        if not file.is_file():
            raise RecipeError(f"recipe_file={spec.recipe_file!r}: no such file")
        recipe = load_recipe_unvalidated(file)
    given = [k for k in PER_RUN_FIELDS if k in spec.recipe]
    if given:
        errors.append(f"recipe.{given[0]}: set by the study for each run (use models / seeds / output_dir)")
    try:
        update_from_dict(recipe, {k: v for k, v in spec.recipe.items() if k not in PER_RUN_FIELDS},
                         source=spec.source or "study", noun="recipe field", error=RecipeError)
    except RecipeError as err:
        errors.append(str(err))
    for item in overrides or []:
        key, value = item.split("=", 1)
        if key.split(".")[0] in PER_RUN_FIELDS:
            errors.append(f"recipe.{key}: set by the study for each run (use models / seeds / output_dir)")
            continue
        try:
            set_dotted(recipe, [(key, value)], source="command line", noun="recipe field", error=RecipeError)
        except RecipeError as err:
            errors.append(str(err))
            continue
        _set_nested(spec.recipe, key.split("."), _get_dotted(recipe, key))
    if errors:
        raise RecipeError("\n".join(errors))
    return recipe


def load_recipe_unvalidated(path: Path) -> Recipe:
    """A recipe file loaded strictly, without a model check (each run sets its own model)."""
    recipe = Recipe()
    update_from_dict(recipe, read_yaml_mapping(path, "recipe file", RecipeError), source=str(path), noun="recipe field",
                     error=RecipeError)
    return recipe


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return copy.deepcopy(obj)


def _set_nested(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def spec_problems(spec: StudySpec, base: Recipe | None = None) -> list[str]:
    out = []
    if not spec.models:
        out.append("models=[]: needs at least one model")
    if len(set(spec.models)) != len(spec.models):
        out.append(f"models={spec.models!r}: a model is listed twice")
    if not spec.seeds:
        out.append("seeds=[]: needs at least one seed")
    if len(set(spec.seeds)) != len(spec.seeds):
        out.append(f"seeds={spec.seeds!r}: a seed is listed twice")
    if spec.baseline is not None and spec.baseline not in spec.models:
        out.append(f"baseline={spec.baseline!r}: not one of the models")
    if not spec.name or "/" in spec.name:
        out.append(f"name={spec.name!r}: must be a folder name")
    e = spec.eval
    if e.data not in EVAL_DATA:
        out.append(f"eval.data={e.data!r}: is not one of {', '.join(EVAL_DATA)}")
    for key in ("test_samples", "probe_train_samples", "modality_samples", "batch_size", "probe_max_iter"):
        if getattr(e, key) < 1:
            out.append(f"eval.{key}={getattr(e, key)!r}: must be >= 1")
    if e.modality and e.modality_samples > e.test_samples:
        out.append(f"eval.modality_samples={e.modality_samples}: more than eval.test_samples={e.test_samples}")
    if e.retrieval is not None and not Path(e.retrieval).exists():
        out.append(f"eval.retrieval={e.retrieval!r}: no such annotations file or folder")
    if e.data == "fashion_mnist" and (e.zeroshot or e.linear_probe or e.modality):
        from msclip.data.fashion_mnist import default_root, fashion_mnist_available

        root = e.fashion_mnist_root or (base.data.fashion_mnist_root if base is not None else None)
        if not fashion_mnist_available(root):
            out.append(f"eval.data=fashion_mnist: the files are not in {root or default_root()} (install "
                       "dataset-fashion-mnist or set eval.fashion_mnist_root)")
    return out


def plan_runs(spec: StudySpec, base: Recipe | None = None) -> list[RunPlan]:
    """Every model x seed as an ordinary run: the shared recipe with model, seed, name and output_dir set,
    ``resume=latest`` (so an interrupted run continues and a fresh one starts from scratch)."""
    base = base if base is not None else base_recipe(spec)
    runs_dir = spec.out_dir / "runs"
    plans = []
    for model in spec.models:
        for seed in spec.seeds:
            recipe = copy.deepcopy(base)
            name = run_name(model, seed)
            recipe.model, recipe.seed, recipe.name, recipe.output_dir = model, seed, name, str(runs_dir)
            recipe.resume = "latest"
            plans.append(RunPlan(model, seed, name, runs_dir / name, recipe))
    return plans


def _run_problems(plan: RunPlan) -> list[str]:
    return [f"recipe: {p}" for p in plan.recipe.problems()]


def save_study(spec: StudySpec, path: str | Path) -> Path:
    """The resolved study (overrides folded in, the whole recipe inlined), loadable by `load_study`."""
    data = spec.to_dict()
    data["recipe_file"] = None
    data["recipe"] = _recipe_dict(base_recipe(spec))
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def _recipe_dict(recipe: Recipe) -> dict:
    return {k: v for k, v in recipe.to_dict().items() if k not in PER_RUN_FIELDS}


def shared_recipe_yaml(recipe: Recipe) -> str:
    """The shared recipe as a recipe file (model etc. are given on each run's command line)."""
    return yaml.safe_dump(_recipe_dict(recipe), sort_keys=False)
