"""`msclip` console script (also `python -m msclip`, e.g. under torchrun): subcommands are the modules in
`msclip/commands/`, found automatically.

Each command module defines NAME, HELP, add_arguments(parser) and run(args) -> int. A user error
(`msclip.errors.MsclipError`, or a missing file) prints `msclip <cmd>: error: <message>` and exits 2; any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Callable

from . import commands
from .errors import MsclipError
from .train.stop import stop_with_parent_from_env
from .version import __version__

# OSErrors about a path the user gave (its message names it): a folder where a file belongs, or no permission.
USER_ERRORS = (MsclipError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


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


def run_guarded(command: str, fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command; a user error becomes one `msclip <cmd>: error: ...` line and exit code 2, Ctrl-C one
    line and 130 (training handles its own Ctrl-C: it checkpoints first)."""
    try:
        return int(fn(args) or 0)
    except USER_ERRORS as err:
        print(f"msclip {command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msclip {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def user_message(err: BaseException) -> str:
    """The error's message; one raised in a DataLoader worker comes back wrapped in the worker's traceback
    ("Caught X in DataLoader worker process 0. Original Traceback ..."): only its own last line is kept."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv: list[str] | None = None) -> int:
    stop_with_parent_from_env()  # a run of `msclip study --jobs` ends with the study, kill -9 included
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return run_guarded(args.command, args._run, args)


def run_command(module_name: str, argv: list[str] | None = None) -> int:
    """Entry for `python -m msclip.commands.<module>`; prefer `python -m msclip <command>`."""
    mod = importlib.import_module(f"{commands.__name__}.{module_name}")
    parser = argparse.ArgumentParser(prog=f"msclip {mod.NAME}", description=mod.HELP)
    mod.add_arguments(parser)
    return run_guarded(mod.NAME, mod.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
