"""`msclip` console script: subcommands are the modules in `msclip/commands/`.

Each command module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from . import commands
from .version import __version__


def _command_modules() -> list[ModuleType]:
    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msclip", description="Modality-shared CLIP: models, training, evaluation")
    parser.add_argument("--version", action="version", version=f"msclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Bad input: one clear line instead of a traceback.
        print(f"msclip {args.command}: error: {err}", file=sys.stderr)
        return 2


def run_command(module_name: str, argv: list[str] | None = None) -> int:
    """Entry for `python -m msclip.commands.<module>` (e.g. under torchrun)."""
    mod = importlib.import_module(f"{commands.__name__}.{module_name}")
    parser = argparse.ArgumentParser(prog=f"msclip {mod.NAME}", description=mod.HELP)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
