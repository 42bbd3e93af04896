"""``msclip compare A.json B.json``: two result files side by side as a markdown table (msclip.eval.compare).

Linear-probe results are compared per dataset (score, chosen hyper-parameter, difference) with the mean
over the datasets both runs scored; other results (retrieval, zero-shot, analysis) by their numeric
metrics.
"""
from __future__ import annotations

import argparse

from msclip.commands._common import run_main

NAME = "compare"
HELP = "compare two result JSON files (linprobe, retrieval, ...) side by side as markdown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A.json")
    parser.add_argument("b", metavar="B.json")
    parser.add_argument("--names", nargs=2, default=None, metavar=("A", "B"), help="column titles")
    parser.add_argument("--output", default=None, metavar="FILE.md", help="also write the table here")


def run(args: argparse.Namespace) -> int:
    from msclip import io as mio
    from msclip.eval.compare import compare, load_result, result_title

    a, b = load_result(args.a), load_result(args.b)
    names = tuple(args.names) if args.names else (result_title(a, args.a), result_title(b, args.b))
    if names[0] == names[1]:
        names = (f"A: {names[0]}", f"B: {names[1]}")
    table = compare(a, b, names)
    print(table)
    if args.output:
        mio.write_text(args.output, table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(NAME, argv)


if __name__ == "__main__":
    from msclip.cli import run_command

    raise SystemExit(run_command("compare"))
