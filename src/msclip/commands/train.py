"""``msclip train --config RECIPE.yaml [overrides]``: every recipe field is an option (``--optim.lr 1e-3``)
or a positional ``key=value``. Multi-process: ``torchrun --nproc_per_node N -m msclip.train.main ...``."""
from __future__ import annotations

import argparse
import typing

from msclip.train.recipe import Recipe, field_paths

NAME = "train"
HELP = "pre-train a model from a YAML recipe (one process, or under torchrun)"
_PREFIX = "ov:"


def _metavar(path: str) -> str:
    obj: typing.Any = Recipe
    for part in path.split("."):
        tp = typing.get_type_hints(obj)[part]
        obj = tp
    text = str(obj).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace(" | None", "|null").replace("NoneType", "null").upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="RECIPE.yaml",
                        help="recipe file; fields it omits keep their defaults")
    group = parser.add_argument_group("recipe fields (override the file; also accepted as key=value)")
    for path in field_paths():
        group.add_argument(f"--{path}", dest=_PREFIX + path, default=argparse.SUPPRESS, metavar=_metavar(path))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=1e-3 train.steps=100")


def collect_overrides(args: argparse.Namespace) -> list[str]:
    items = [f"{k[len(_PREFIX):]}={v}" for k, v in vars(args).items() if k.startswith(_PREFIX)]
    return items + list(getattr(args, "overrides", []) or [])


def run(args: argparse.Namespace) -> int:
    from msclip.train.main import run_from_cli

    return run_from_cli(args.config, collect_overrides(args))


if __name__ == "__main__":  # torchrun -m msclip.commands.train ...
    from msclip.cli import run_command

    raise SystemExit(run_command("train"))
