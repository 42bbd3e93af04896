"""What every evaluation needs around the model: the checkpoint that will be loaded, the model itself, its
eval transform, and the model/checkpoint/versions block of each report."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from msclip.errors import MissingFileError, MsclipError

log = logging.getLogger(__name__)


class ModelLoadError(MsclipError):
    """A model spec or checkpoint cannot be built / loaded; the message names both."""


def resolve_checkpoint(model_spec: str, pretrained: str | None) -> str | None:
    """The weights file that will be loaded (checked to exist): `pretrained`, else the model's own
    (`msclip.factory.default_weights`: a model or run folder's `model.safetensors`, a weights file given as the
    model, an official yaml's MODEL.PRETRAINED_MODEL, which must exist), else None (random weights)."""
    from msclip.factory import default_weights

    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise MissingFileError(f"checkpoint --pretrained {pretrained!r} does not exist")
        return pretrained
    if model_spec.endswith((".yaml", ".yml")) and not Path(model_spec).is_file():
        raise MissingFileError(f"model yaml {model_spec!r} does not exist")
    found = default_weights(model_spec, strict=True)
    return None if found is None else str(found)


def load_model(model_spec: str, checkpoint: str | None, device: torch.device, precision: str) -> Any:
    """Build the model and load `checkpoint`; a bad spec or a config/checkpoint mismatch -> ModelLoadError."""
    import msclip

    try:
        model = msclip.create_model(model_spec, pretrained=checkpoint, device=device, precision=precision)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:  # config and checkpoint errors
        what = f"checkpoint {checkpoint!r} into model {model_spec!r}" if checkpoint else f"model {model_spec!r}"
        raise ModelLoadError(f"cannot load {what}: {e}") from e
    if checkpoint is None:
        log.warning("no checkpoint for %r; the model has RANDOM weights, so the numbers are chance level "
                    "(pass --pretrained)", model_spec)
    return model.eval()


def eval_transform(model: Any) -> Any:
    from msclip.transforms import image_transform

    return image_transform(model.cfg.preprocess, model.cfg.vision.image_size, is_train=False)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_report(model_spec: str, model: Any, checkpoint: str | None, device: torch.device, precision: str) -> dict:
    """The model, checkpoint (path, bytes, sha256), device, precision and versions block of a report."""
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
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
