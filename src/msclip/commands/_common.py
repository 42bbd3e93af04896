"""Helpers shared by the evaluation commands: model arguments, device, checkpoint resolution, loading."""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

class UsageError(ValueError):
    """A command-line input is unusable; reported as `error: ...` with exit code 2."""


# ---------------------------------------------------------------------------------- shared helpers
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|YAML",
                        help="named msclip config (see `msclip info`), a .json config, or an official .yaml")
    parser.add_argument("--pretrained", default=None, metavar="PATH",
                        help="weights (msclip / official / open_clip layout); default: MODEL.PRETRAINED_MODEL "
                             "of an official yaml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16 casts the weights (fast on GPUs and bf16-capable CPUs)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    parser.add_argument("--workers", type=int, default=min(6, os.cpu_count() or 1),
                        help="DataLoader worker processes for image decoding / tokenisation")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def pick_device(requested: str | None) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available")
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def resolve_checkpoint(model_spec: str, pretrained: str | None) -> str | None:
    """The weights file that will be loaded (checked to exist), or None for random weights."""
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise UsageError(f"checkpoint --pretrained {pretrained!r} does not exist")
        return pretrained
    if model_spec.endswith((".yaml", ".yml")):
        from msclip.official_config import load_official_yaml

        if not Path(model_spec).is_file():
            raise UsageError(f"model yaml {model_spec!r} does not exist")
        default = load_official_yaml(model_spec).pretrained_path
        if default is not None:
            if not Path(default).is_file():
                raise UsageError(f"{model_spec}: MODEL.PRETRAINED_MODEL {default!r} does not exist (relative to "
                                 f"the working directory {os.getcwd()!r}); download it or pass --pretrained")
            return default
    return None


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_model(model_spec: str, checkpoint: str | None, device: torch.device, precision: str):
    """Build the model and load `checkpoint`; a bad spec or a config/checkpoint mismatch -> UsageError."""
    import msclip

    try:
        model = msclip.create_model(model_spec, pretrained=checkpoint, device=device, precision=precision)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:  # ConfigError/CheckpointMismatch are ValueErrors
        what = f"checkpoint {checkpoint!r} into model {model_spec!r}" if checkpoint else f"model {model_spec!r}"
        raise UsageError(f"cannot load {what}: {e}") from e
    if checkpoint is None:
        print(f"warning: no checkpoint for {model_spec!r}; the model has RANDOM weights, so the numbers "
              "are chance level (pass --pretrained)", file=sys.stderr)
    return model


def model_report(model_spec: str, model, checkpoint: str | None, device: torch.device, precision: str) -> dict:
    import msclip

    ckpt = None
    if checkpoint is not None:
        ckpt = {"path": checkpoint, "bytes": os.path.getsize(checkpoint), "sha256": file_sha256(checkpoint)}
    return {
        "model": {"spec": model_spec, "name": model.cfg.name, "parameters": sum(p.numel() for p in model.parameters()),
                  "config": model.cfg.to_dict()},
        "checkpoint": ckpt,
        "random_weights": checkpoint is None,
        "device": str(device), "precision": precision,
        "versions": {"msclip": msclip.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def progress_flag(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None  # None: shown on a terminal only


def eval_transform(model):
    from msclip.transforms import image_transform

    return image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)


# ---------------------------------------------------------------------------------- command
