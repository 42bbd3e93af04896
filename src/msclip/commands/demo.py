"""``msclip demo``: the Fashion-MNIST MS-CLIP-S vs CLIP demo (msclip.demo; its recipes ship in the package)."""
from __future__ import annotations

import argparse

from msclip.commands._common import run_main

NAME = "demo"
HELP = "pre-train a tiny MS-CLIP-S and a CLIP baseline on Fashion-MNIST, compare them zero-shot, write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from msclip import demo

    demo.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from msclip import demo

    return demo.run(args)


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("demo"))
