"""Reading and writing model weights: msclip's own format, the official MS-CLIP layout, and
OpenAI / open_clip CLIP layouts. Every read uses `weights_only=True`; every write is atomic."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import ModelCfg
from .convert import CheckpointMismatch, check_mismatch, from_official, looks_official, tensor_problem, to_official
from .errors import MissingFileError, MsclipError
from .io import atomic_write, torch_save, torch_writer

FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(MsclipError):
    """A checkpoint file cannot be read or does not hold model weights."""


def _read(path: Path, tensors: bool, mmap: bool = False) -> tuple[Any, dict | None]:
    """(safetensors: its tensors or {} / a torch file: its object, embedded config of a safetensors file).
    Every unreadable file (missing, truncated, corrupt, not a checkpoint) is an error naming it."""
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
        return state, json.loads(meta["msclip_config"]) if "msclip_config" in meta else None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), None
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated, corrupt or not a torch file?): "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _torch_config(obj: Any) -> dict | None:
    config = obj.get("model_config") if isinstance(obj, dict) else None
    return config if isinstance(config, dict) else None


def embedded_config(path: str | os.PathLike) -> dict | None:
    """The model config msclip stores in its own weights files (safetensors metadata, a torch file's
    `model_config`, train states included), or None; reads no tensor data (torch files are memory-mapped)."""
    path = Path(path)
    obj, config = _read(path, tensors=False, mmap=True)
    return config if path.suffix == ".safetensors" else _torch_config(obj)


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a weights file -> (flat state_dict, embedded model config or None)."""
    path = Path(path)
    obj, config = _read(path, tensors=True)
    if path.suffix == ".safetensors":
        return obj, config
    config = _torch_config(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds {type(obj).__name__}, not a state_dict of tensors")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is not a string; not a state_dict")
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; not a state_dict")
    return state, config


def convert_state_dict(state: dict[str, Any], model: nn.Module, source: str = "checkpoint") -> dict:
    """Any supported layout -> msclip keys for `model`, strictly checked."""
    target = model.state_dict()
    if looks_official(state):
        return from_official(state, target, model.cfg, source)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [p for k in target if k in state for p in [tensor_problem(k, state[k], target[k].shape)] if p]
    check_mismatch(source, model.cfg.name, [("missing keys", missing), ("unexpected keys", unexpected),
                                            ("wrong shapes or types", wrong)])
    return state


def _architecture(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in ("name", "preprocess", "init_logit_scale")}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights from `path` (msclip, official MS-CLIP, OpenAI or open_clip layout) into `model`."""
    state, config = load_state_dict_file(path)
    if config is not None:
        mine = _architecture(model.cfg.to_dict())
        theirs = _architecture(ModelCfg.from_dict(config, source=f"{path} (embedded config)").to_dict())
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise CheckpointMismatch(f"{path} was saved from a different architecture "
                                     f"(differs in: {', '.join(diff)}) than model {model.cfg.name!r}")
    converted = convert_state_dict(state, model, source=str(path))
    model.load_state_dict(converted, strict=True)
    return model


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Save weights + config (`.safetensors`, or a torch file otherwise) atomically."""
    atomic_write(path, weights_writer(model, path))


def weights_writer(model: nn.Module, path: str | os.PathLike) -> Callable[[str], None]:
    """The `write(tmp)` of `save_pretrained`'s file (for a group of files written together, `io.atomic_write_many`)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.cfg.to_dict()
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"msclip_config": json.dumps(config), "msclip_format": str(FORMAT_VERSION)}
        return lambda tmp: save_file(state, tmp, metadata=meta)
    return torch_writer({"msclip_format": FORMAT_VERSION, "model_config": config, "state_dict": state})


def save_official(model: nn.Module, path: str | os.PathLike) -> None:
    """Export to the official MS-CLIP layout (raw state_dict, shared tensors under both names)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(to_official(state, model.cfg), path)
