"""Argument helpers shared by the evaluation commands (parsing only; the work lives in msclip.eval)."""
from __future__ import annotations

import argparse
import os

import torch

from msclip.device import pick_device as _pick
from msclip.errors import MsclipError


class UsageError(MsclipError):
    """A command-line input is unusable; reported as `msclip <cmd>: error: ...` with exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|YAML",
                        help="named msclip config (see `msclip info`), a .json config, or an official .yaml")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="weights (msclip / official / open_clip layout); default: MODEL.PRETRAINED_MODEL "
                             "of an official yaml")
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 casts the weights (fast on GPUs and bf16-capable CPUs)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1),
                        help="DataLoader worker processes for image decoding / tokenisation")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def check_sizes(args: argparse.Namespace, *flags: str) -> None:
    """--batch-size (and the other named flags) >= 1, --workers >= 0."""
    for flag in ("batch_size", *flags):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")


def pick_device(requested: str | None) -> torch.device:
    return _pick(requested or "auto")


def progress_flag(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None  # None: shown on a terminal only


def run_main(name: str, argv: list[str] | None) -> int:
    """`main(argv)` of a command module: the `msclip NAME ...` console path, errors included."""
    from msclip.cli import main

    return main([name, *(argv or [])])
