"""``msclip train --config RECIPE.yaml [overrides]``: every recipe field is an option (``--optim.lr 1e-3``)
or a positional ``key=value``. Multi-process: ``torchrun --nproc_per_node N -m msclip train ...``."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from msclip.train.recipe import Recipe, field_paths
from msclip.typed_config import describe_type, field_type

NAME = "train"
HELP = "pre-train a model from a YAML recipe (one process, or under torchrun -m msclip train)"
_PREFIX = "ov:"
EXIT_NONFINITE = 3  # the run stopped on repeated non-finite losses (distinct from a user error's 2)
EXIT_WORKER_DIED = 4  # a data loader worker died (the current step was checkpointed first)


def _metavar(path: str) -> str:
    return describe_type(field_type(Recipe, path)).upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="recipe file; fields it omits keep their defaults (see docs/training.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in the same folder (its checkpoints, weights and metrics)")
    group = parser.add_argument_group("recipe fields (override the file; also accepted as key=value)")
    for path in field_paths():
        group.add_argument(f"--{path}", dest=_PREFIX + path, default=argparse.SUPPRESS, metavar=_metavar(path))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-3 train.steps=100")


def collect_overrides(args: argparse.Namespace) -> list[str]:
    items = [f"{k[len(_PREFIX):]}={v}" for k, v in vars(args).items() if k.startswith(_PREFIX)]
    return items + list(getattr(args, "overrides", []) or [])


def resume_hint(args: argparse.Namespace, run_dir: Path) -> str:
    """The command line that continues this run: the same recipe and overrides, resume=latest."""
    keep = [o for o in collect_overrides(args) if not o.startswith(("name=", "resume=", "output_dir="))]
    words = ["msclip", "train"] + (["--config", args.config] if args.config else []) + keep
    words += [f"output_dir={run_dir.parent}", f"name={run_dir.name}", "resume=latest"]
    return " ".join(shlex.quote(w) for w in words)


def run(args: argparse.Namespace) -> int:
    from msclip.train import DataWorkerDied, NonFiniteLossError, load_recipe, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(args.config, collect_overrides(args))  # a RecipeError is printed by msclip.cli
    try:
        result = train(recipe, overwrite=args.overwrite)
    except NonFiniteLossError as err:
        print(f"msclip train: stopped: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except DataWorkerDied as err:
        hint = f"; resume with: {resume_hint(args, err.run_dir)}" if err.run_dir is not None else ""
        print(f"msclip train: stopped: {err}{hint}", file=sys.stderr)
        return EXIT_WORKER_DIED
    except KeyboardInterrupt:  # Ctrl-C before training installed its own handler: nothing to save yet
        print("msclip train: interrupted before the first step; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT
    master = int(os.environ.get("RANK", "0")) == 0
    if result.stopped_by:
        if master:
            name = signal.Signals(result.stopped_by).name
            print(f"msclip train: stopped by {name} at step {result.state.step}; checkpoint "
                  f"{result.last_checkpoint}; resume with: {resume_hint(args, result.run_dir)}", file=sys.stderr)
        return 128 + result.stopped_by
    if master:
        print(f"run folder: {result.run_dir} ({result.steps_run} steps in this run, {result.state.step} of "
              f"{result.total_steps} done, {result.wall_s:.1f} s)")
        if result.exported:
            print(f"weights: {result.exported} (msclip.create_model({recipe.model!r}, pretrained=...))")
    return 0

