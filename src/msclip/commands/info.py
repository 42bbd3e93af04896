"""`msclip info`: the named configs and how their parameters split between the modalities."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "info"
HELP = "list model configs with parameter counts (shared / image-only / text-only)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help="names, .json configs or official .yaml files (default: all named)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-tiny", action="store_true", help="skip the *-tiny test configs")


def parameter_table(names: list[str]) -> list[dict]:
    import torch

    from ..factory import get_model_config
    from ..model import MSCLIP

    rows = []
    with torch.device("meta"):  # counts need shapes only: no memory, no init time
        for name in names:
            cfg = get_model_config(name)
            counts = MSCLIP(cfg).parameter_counts()
            rows.append({"model": name, **counts, "shared_pct": 100.0 * counts["shared"] / counts["total"]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<22}{'total':>14}{'shared':>14}{'image-only':>14}{'text-only':>14}{'shared %':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<22}{r['total']:>14,}{r['shared']:>14,}{r['image']:>14,}{r['text']:>14,}"
                     f"{r['shared_pct']:>9.1f}%")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..factory import list_models

    names = args.models or [m for m in list_models() if not (args.no_tiny and m.endswith("-tiny"))]
    rows = parameter_table(names)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows), file=sys.stdout)
    return 0
